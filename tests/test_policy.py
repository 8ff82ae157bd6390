"""Who may talk to the chat: the Host allow-list and no cross-site writes.

A rebinding page sends the attacker's name in Host; a cross-site page sends its own origin in
Origin. The browser tests then open another site's page, and the chat page at every address.
"""

import contextlib
import json
import socket
import threading
import urllib.parse

import pytest
import websockets
from websockets.sync.client import connect

from tests.helpers import (
    ALL_ROUTES,
    REBIND,
    handshake,
    receive,
    refused_handshake,
    request,
    running_servers,
    say,
    stored_texts,
    texts,
)


@pytest.mark.parametrize(
    "bind, host, origin, allowed",
    [
        ("127.0.0.1", "127.0.0.1", None, True),  # scripts and the CLI client send no Origin
        ("127.0.0.1", "127.0.0.1", "http://127.0.0.1:{port}", True),
        ("127.0.0.1", "localhost", "http://localhost:{port}", True),
        # 127.0.0.2: a LAN address typed in
        ("0.0.0.0", "127.0.0.2", "http://127.0.0.2:{port}", True),
        ("127.0.0.1", "127.0.0.1", "http://evil.example:{port}", False),
        ("127.0.0.1", "127.0.0.1", "http://127.0.0.1:1", False),
        ("127.0.0.1", "127.0.0.1", "https://127.0.0.1:{port}", False),
        ("127.0.0.1", "127.0.0.1", "null", False),
        ("0.0.0.0", "127.0.0.2", "http://127.0.0.3:{port}", False),
    ],
)
def test_origin_must_be_the_chat_page(bind, host, origin, allowed):
    """The page's own origin is whatever address was typed: the handshake's Host, the HTTP port."""
    with running_servers(bind) as servers:
        url = f"ws://{host}:{servers.ws_port}/"
        origin = origin and origin.format(port=servers.port)
        if allowed:
            with connect(url, open_timeout=5, origin=origin) as ws:
                assert receive(ws, "history")["messages"] == []
        else:
            assert refused_handshake(url, origin=origin) == 403


@pytest.mark.parametrize(
    "name", ["localhost.", "chat.localhost.", "chat.lan.", "LocalHost.", "CHAT.LAN"]
)
def test_a_page_opened_at_a_name_with_a_trailing_dot_or_capitals_can_post_and_connect(name):
    with running_servers(allow_host=["chat.lan"]) as servers:
        origin = f"http://{name}:{servers.port}"
        headers = {"Host": f"{name}:{servers.port}", "Origin": origin}
        status, _, _ = request(servers.port, "POST", "/messages", {"text": "hi"}, headers=headers)
        assert status == 201
        with handshake(servers.ws_port, name, origin=origin) as ws:
            assert [m["text"] for m in receive(ws, "history")["messages"]] == ["hi"]


@pytest.mark.browser
def test_browser_a_page_opened_at_localhost_with_a_trailing_dot_goes_online_and_posts(
    server, open_page
):
    from playwright.sync_api import expect

    page = open_page(url=f"http://localhost.:{server.port}/")  # waits for "online"
    say(page, "from localhost.")
    expect(texts(page)).to_have_text(["from localhost."])
    assert stored_texts(server.port) == ["from localhost."]


@pytest.mark.parametrize("method, path", ALL_ROUTES)
def test_a_foreign_host_is_refused_on_every_route_with_the_fix_named(server, method, path):
    host = {"Host": f"{REBIND}:{server.port}"}
    status, content_type, body = request(
        server.port, method, path, {"text": "rebound"}, headers=host
    )
    assert status == 403 and content_type.startswith("application/json")
    assert f"--allow-host {REBIND}" in json.loads(body)["errors"]["host"]
    assert stored_texts(server.port) == []


@pytest.mark.parametrize("path", ["/", "/chat", "/ws", "/echo"])
def test_a_foreign_host_is_refused_on_the_handshake_with_the_fix_named(server, path):
    with (
        pytest.raises(websockets.exceptions.InvalidStatus) as refused,
        handshake(server.ws_port, REBIND, path),
    ):
        pass
    assert refused.value.response.status_code == 403
    assert f"--allow-host {REBIND}".encode() in refused.value.response.body


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "localhost:{port}",
        "LocalHost",
        "chat.localhost:{port}",
        "[::1]:{port}",
        "192.0.2.7",
        "[fe80::1]",
        socket.gethostname(),
        "localhost.:{port}",
    ],
)
def test_names_that_cannot_be_rebound_are_served(server, host):
    status, _, _ = request(
        server.port, "GET", "/messages", headers={"Host": host.format(port=server.port)}
    )
    assert status == 200
    with handshake(server.ws_port, host.split(":{port}")[0]) as ws:
        assert receive(ws, "history")["messages"] == []


def test_a_request_without_host_is_served(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        body = b"text=from+HTTP/1.0"
        sock.sendall(
            b"POST /messages HTTP/1.0\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 201")
    assert stored_texts(server.port) == ["from HTTP/1.0"]


def test_allow_host_admits_a_name_on_http_and_the_handshake(chat_process):
    process = chat_process(
        "--port", "0", "--ws-port", "0", "--allow-host", "chat.lan", "--allow-host", "Other.LAN"
    )
    process.urls()
    page_origin = f"http://chat.lan:{process.port}"
    headers = {"Host": f"chat.lan:{process.port}", "Origin": page_origin}
    assert (
        request(process.port, "POST", "/messages", {"text": "via chat.lan"}, headers=headers)[0]
        == 201
    )
    assert request(process.port, "GET", "/config", headers={"Host": "other.lan"})[0] == 200
    with handshake(process.ws_port, "chat.lan", origin=page_origin) as ws:
        assert [m["text"] for m in receive(ws, "history")["messages"]] == ["via chat.lan"]
    assert request(process.port, "GET", "/config", headers={"Host": "third.lan"})[0] == 403


@pytest.mark.parametrize(
    "origin",
    [
        "null",
        "http://localhost:{port}",
        "http://evil.example",
        "https://127.0.0.1:{port}",
        "http://127.0.0.1:1",
    ],
)
@pytest.mark.parametrize("path", ["/messages", "/send_message"])
def test_a_post_from_another_origin_is_refused_and_stores_nothing(server, origin, path):
    headers = {"Origin": origin.format(port=server.port)}
    status, _, body = request(
        server.port,
        "POST",
        path,
        "text=cross-site",
        "application/x-www-form-urlencoded",
        headers=headers,
    )
    assert status == 403
    assert "only the chat's own page" in json.loads(body)["errors"]["origin"]
    assert stored_texts(server.port) == []


@pytest.mark.parametrize("origin", [None, "http://127.0.0.1:{port}"])
def test_posts_without_origin_or_from_the_chat_page_are_stored(server, origin):
    headers = {"Origin": origin.format(port=server.port)} if origin else {}
    status, _, _ = request(
        server.port,
        "POST",
        "/messages",
        "name=curl&text=hello",
        "application/x-www-form-urlencoded",
        headers=headers,
    )
    assert status == 201
    assert stored_texts(server.port) == ["hello"]


@contextlib.contextmanager
def other_site(html):
    """Another web site: a tiny HTTP server answering every GET with `html`, on a free port."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=site.serve_forever)
    thread.start()
    try:
        yield site.server_address[1]
    finally:
        site.shutdown()
        site.server_close()
        thread.join(5)


CROSS_SITE_WRITES = {
    "form post": """<form method="post" action="{chat}/messages"><input name="text" value="cross-site form"></form>
                    <script>document.forms[0].submit()</script>""",
    "no-cors fetch with a query string": """<script>
                    fetch("{chat}/messages?name=evil&text=cross-site+query", {{method: "POST", mode: "no-cors"}})
                    </script>""",
    "no-cors fetch with a text/plain body": """<script>
                    fetch("{chat}/messages", {{method: "POST", mode: "no-cors",
                                              headers: {{"Content-Type": "text/plain"}}, body: "cross-site body"}})
                    </script>""",
}


@pytest.mark.browser
@pytest.mark.parametrize("attack", CROSS_SITE_WRITES)
def test_browser_a_page_on_another_site_cannot_post_to_the_chat(server, browser, attack):
    chat_url = f"http://127.0.0.1:{server.port}"
    with other_site(CROSS_SITE_WRITES[attack].format(chat=chat_url)) as site_port:
        context = browser.new_context()
        try:
            page = context.new_page()
            with page.expect_response(
                lambda response: response.url.startswith(f"{chat_url}/messages")
            ) as answer:
                page.goto(f"http://localhost:{site_port}/")  # localhost and 127.0.0.1: two sites
            assert answer.value.status == 403
        finally:
            context.close()
    assert stored_texts(server.port) == []


@pytest.mark.browser
def test_browser_the_page_works_from_127_0_0_1_localhost_and_a_lan_address(chat_process, open_page):
    from playwright.sync_api import expect

    process = chat_process("--host", "0.0.0.0", "--port", "0", "--ws-port", "0")
    first_page = process.urls()[0].split()[-1]  # a LAN address when this machine has one
    hosts = ["127.0.0.1", "localhost"]
    lan = urllib.parse.urlsplit(first_page).hostname
    if lan != "127.0.0.1":
        hosts.append(lan)
    pages = [open_page(url=f"http://{host}:{process.port}/?key={process.key}") for host in hosts]
    for host, page in zip(hosts, pages, strict=True):
        say(page, f"from {host}")
        expect(texts(page).last).to_have_text(f"from {host}")  # stored before the next one is sent
    for page in pages:
        expect(texts(page)).to_have_text([f"from {host}" for host in hosts])
    if lan == "127.0.0.1":
        pytest.skip("this machine has no address but loopback: the LAN part was not tried")
