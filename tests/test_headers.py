"""Hostile headers: what a client controls in its headers (Host forms, Content-Type parameters
and case, headers sent twice, HEAD and OPTIONS). No answer is a 500, and none leaves a
traceback in the log. Then the class, not only the instances: any headers a client may send,
fuzzed, on both servers.
"""

import base64
import http.client
import json
import os
import socket

from parts import fixes

# isort: split
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import (
    assert_room_is_sound,
    raw_handshake,
    raw_request,
    request,
    stored_texts,
    tracebacks,
    wait_for_health,
)


@pytest.mark.parametrize("host", ["localhost:", "127.0.0.1:", "[::1]:"])
def test_a_host_with_an_empty_port_is_served_on_the_page_and_the_handshake(server, host):
    status, answer = raw_request(server.port, "GET", "/", [("Host", host)])
    assert status == 200 and b'id="chat-box"' in answer
    assert raw_handshake(server.ws_port, [("Host", host)])[0] == 101


@pytest.mark.parametrize("host", ["localhost:abc", "127.0.0.1:x", "[::1]:x", "localhost:99999"])
def test_a_host_port_that_is_not_a_number_is_a_400_naming_the_host_header(server, caplog, host):
    for path in ("/", "/messages"):
        status, answer = raw_request(server.port, "GET", path, [("Host", host)])
        assert status == 400
        assert (
            "port in the Host header"
            in json.loads(answer.partition(b"\r\n\r\n")[2])["errors"]["host"]
        )
    status, body = raw_handshake(server.ws_port, [("Host", host)])
    assert status == 400 and b"port in the Host header" in body
    assert tracebacks(caplog) == []


MULTIPART_HI = b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi\r\n--b--\r\n'


READERS = [
    ("application/json", b'{"text": "hi"}'),
    ("application/x-www-form-urlencoded", b"text=hi"),
    ("multipart/form-data; boundary=b", MULTIPART_HI),
]


@pytest.mark.parametrize("parameter", ["body=x", "content_length=4", "Body=x", "charset=utf-8"])
@pytest.mark.parametrize("content_type, body", READERS)
def test_content_type_parameters_never_reach_the_body_readers(
    server, content_type, body, parameter
):
    status, _, data = request(
        server.port, "POST", "/messages", body, f"{content_type}; {parameter}"
    )
    assert (status, json.loads(data)["text"]) == (201, "hi")


def test_text_plain_with_a_parameter_named_body_is_read_too(server):
    status, _, data = request(server.port, "POST", "/messages?text=hi", b"hi", "text/plain; body=x")
    assert (status, json.loads(data)["text"]) == (201, "hi")


@pytest.mark.parametrize("content_type, body", READERS)
def test_media_types_are_read_whatever_their_case(server, content_type, body):
    media_type, _, parameters = content_type.partition(";")
    shouted = media_type.upper() + (f";{parameters.upper()}" if parameters else "")
    shouted = shouted.replace("BOUNDARY=B", "BOUNDARY=b")  # a boundary is case-sensitive
    status, _, data = request(server.port, "POST", "/messages", body, shouted)
    assert (status, json.loads(data)["text"]) == (201, "hi")


def test_a_multipart_text_with_bad_utf8_is_a_400_like_every_other_body(server):
    body = b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\n\xff\xfe\r\n--b--\r\n'
    status, _, data = request(
        server.port, "POST", "/messages", body, "multipart/form-data; boundary=b"
    )
    assert status == 400 and "not valid UTF-8" in json.loads(data)["errors"]["body"]
    assert stored_texts(server.port) == []


@pytest.mark.parametrize("header", ["Host", "Origin"])
def test_a_host_or_origin_sent_twice_on_the_handshake_is_a_400_naming_it(server, caplog, header):
    values = {
        "Host": ["127.0.0.1", "localhost"],
        "Origin": ["http://a.example", "http://b.example"],
    }
    headers = [("Host", "127.0.0.1")] if header == "Origin" else []
    status, body = raw_handshake(server.ws_port, headers + [(header, v) for v in values[header]])
    assert status == 400 and f"The {header} header is sent more than once".encode() in body
    assert tracebacks(caplog) == []


def test_a_host_sent_twice_over_http_is_a_400_and_stores_nothing(server):
    # waitress joins repeated headers with a comma (WSGI), which no host name has
    headers = [("Host", "127.0.0.1"), ("Host", "localhost"), ("Content-Type", "application/json")]
    status, answer = raw_request(server.port, "POST", "/messages", headers, b'{"text": "hi"}')
    assert status == 400 and b'"host"' in answer
    assert stored_texts(server.port) == []


def test_an_origin_sent_twice_over_http_is_not_the_chat_page_and_a_post_is_refused(server):
    page = f"http://127.0.0.1:{server.port}"
    headers = [("Host", f"127.0.0.1:{server.port}"), ("Origin", page), ("Origin", page)]
    headers.append(("Content-Type", "application/json"))
    status, answer = raw_request(server.port, "POST", "/messages", headers, b'{"text": "hi"}')
    assert status == 403 and b'"origin"' in answer
    assert stored_texts(server.port) == []


GET_ROUTES = ["/", "/chat", "/config", "/messages", "/get_messages", "/health", "/nope"]


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_answers_as_get_without_the_body(server, path):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("HEAD", path)
        head = connection.getresponse()
        assert head.read() == b""
        connection.request("GET", path)  # the same connection: no stray byte came after HEAD
        get_answer = connection.getresponse()
        body = get_answer.read()
    finally:
        connection.close()
    assert head.status == get_answer.status
    assert head.getheader("Content-Type") == get_answer.getheader("Content-Type")
    assert int(head.getheader("Content-Length")) == len(body)


@pytest.mark.parametrize("path", GET_ROUTES[:-1])
def test_options_names_head_among_the_methods_of_a_get_route(server, path):
    response = request(server.port, "OPTIONS", path)
    assert response.status == 200
    assert {"GET", "HEAD"} <= set(response.headers["Allow"].split(", "))


# Each strategy mixes forms a browser sends with what no browser would: half of the requests get
# past the Host and Origin checks, so that what comes after them is fuzzed too.
LATIN1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")


served_names = st.sampled_from(["127.0.0.1", "localhost", "LocalHost", "chat.localhost", "[::1]"])


odd_names = st.sampled_from(["[::1", "::1", "[x]", "rebind.example", "", ".", "@", "a,b", "a b"])


ports = st.sampled_from(["", "0", "8000", "65536", "abc", " 1", "+1", "\xb2"])


host_headers = st.builds(
    lambda name, dot, port: name + dot + ("" if port is None else f":{port}"),
    served_names | odd_names | st.text(LATIN1, max_size=12),
    st.sampled_from(["", ".", ".."]),
    st.none() | ports | st.text(LATIN1, max_size=6),
)


origins = st.sampled_from(["null", ""]) | st.builds(
    lambda scheme, host: f"{scheme}://{host}", st.sampled_from(["http", "HTTP", "ws"]), host_headers
)


def random_case(text):
    """`text` with each letter in upper or lower case."""
    return st.lists(st.booleans(), min_size=len(text), max_size=len(text)).map(
        lambda upper: "".join(
            c.upper() if u else c.lower() for c, u in zip(text, upper, strict=True)
        )
    )


media_types = (
    st.sampled_from(fixes.READABLE)
    | st.sampled_from(["application/xml", "", "multipart/mixed", "application/json+x"])
).flatmap(random_case)


parameters = st.tuples(
    st.sampled_from(["body", "Body", "content_length", "charset", "boundary", "BOUNDARY", ""])
    | st.text(LATIN1, max_size=8),
    st.sampled_from(["b", '"b"', "utf-8", "bogus", '"', "", "a;b", '"a;b"'])
    | st.text(LATIN1, max_size=8),
)


content_types = st.builds(
    lambda media_type, params: media_type + "".join(f"; {k}={v}" for k, v in params),
    media_types,
    st.lists(parameters, max_size=3),
)


other_headers = st.tuples(
    st.sampled_from(["Accept", "Cookie", "Authorization", "X-Forwarded-For", "Content-Type"]),
    st.text(LATIN1, max_size=20),
)


@st.composite
def client_headers(draw):
    """Host: half of the time one that is served, else 0 to 3 of any form; Origin: half of the
    time none, else 1 or 2; Content-Type: once or 0 to 2 times; a few others; names in any
    case, in any order."""
    hosts = draw(
        st.lists(served_names, min_size=1, max_size=1) | st.lists(host_headers, max_size=3)
    )
    sent_origins = draw(st.just([]) | st.lists(origins, min_size=1, max_size=2))
    types = draw(
        st.lists(content_types, min_size=1, max_size=1) | st.lists(content_types, max_size=2)
    )
    headers = [(draw(random_case("Host")), value) for value in hosts]
    headers += [(draw(random_case("Origin")), value) for value in sent_origins]
    headers += [(draw(random_case("Content-Type")), value) for value in types]
    headers += draw(st.lists(other_headers, max_size=2))
    return draw(st.permutations(headers))


bodies = st.sampled_from(
    [b'{"text": "fuzz"}', b"text=fuzz", MULTIPART_HI.replace(b"hi", b"fuzz"), b""]
) | st.binary(max_size=100)


@pytest.mark.timeout(240)
def test_fuzzed_headers_on_every_route_and_method_never_get_a_500_or_a_traceback(server, caplog):
    @settings(max_examples=200, deadline=None, database=None)
    @given(
        st.sampled_from(["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE"]),
        st.sampled_from([*GET_ROUTES, "/send_message"]),
        client_headers(),
        bodies,
    )
    def check(method, path, headers, body):
        status, _ = raw_request(server.port, method, path, headers, body)
        assert status < 500
        assert tracebacks(caplog) == []

    check()
    assert_room_is_sound(server)


@pytest.mark.timeout(240)
def test_fuzzed_handshake_headers_never_get_a_500_or_a_traceback(server, caplog):
    @settings(max_examples=150, deadline=None, database=None)
    @given(
        st.sampled_from(["GET", "GET", "HEAD", "OPTIONS"]),
        st.sampled_from(["/", "/chat", "/ws", "/echo", "/nope", "/?name=x"]),
        client_headers(),
    )
    def check(method, path, headers):
        status, _ = raw_handshake(server.ws_port, headers, path, method)
        assert status < 500
        assert tracebacks(caplog) == []

    check()
    wait_for_health(server.port, clients=0)


def test_a_multipart_form_with_a_boundary_is_read(server):
    body = b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nfrom a form\r\n--b--\r\n'
    status, _, data = request(
        server.port, "POST", "/messages", body, "multipart/form-data; boundary=b"
    )
    assert status == 201 and json.loads(data)["text"] == "from a form"


@pytest.mark.parametrize("host", ["[", ":8000", "@"])
def test_a_host_header_with_no_host_name_is_a_400_and_logs_nothing(server, caplog, host):
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.ws_port), timeout=5) as sock:
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(
                f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            assert sock.recv(1024).startswith(b"HTTP/1.1 400")
    status, _, body = request(
        server.port, "POST", "/messages", {"text": "hi"}, headers={"Host": host}
    )
    assert status == 400 and "not a host name" in json.loads(body)["errors"]["host"]
    assert stored_texts(server.port) == []
    assert [r for r in caplog.records if r.levelno >= 30] == []
