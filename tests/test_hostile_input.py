"""Clients that misbehave on purpose: random bytes, invalid UTF-8, odd frames and bodies, and
property-based fuzzing of frames and HTTP requests with the invariants that must hold. Each
bad input gets a clear error and loses nothing else.
"""

import json
import logging
import random
import socket
import urllib.parse

import chat

# isort: split
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from tests.helpers import (
    assert_room_is_sound,
    close_code,
    get,
    joined,
    post,
    presence_changes,
    raw_request,
    receive,
    receive_until,
    request,
    seed,
    ws_url,
)


def test_random_bytes_at_every_route_never_give_a_500(server):
    rng = random.Random(2026)  # the same bytes every run; hypothesis explores further below
    paths = ["/", "/chat", "/config", "/messages", "/get_messages", "/send_message", "/health"]
    content_types = [
        "application/json",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain",
        "application/json; charset=latin-1",
    ]
    for _ in range(400):
        body = rng.randbytes(rng.randrange(0, 300))
        method, path, content_type = (
            rng.choice(["GET", "POST"]),
            rng.choice(paths),
            rng.choice(content_types),
        )
        status, _, _ = request(
            server.port, method, path, body, content_type, source=f"127.0.1.{rng.randrange(1, 255)}"
        )
        assert status < 500
    assert get(server.port, "/health")[0] == 200


def test_invalid_utf8_closes_that_connection_with_1007_and_only_that_one(server):
    with joined(server, name="other") as (other, _):
        sock = socket.create_connection(("127.0.0.1", server.ws_port), timeout=5)
        with connect(ws_url(server), sock=sock, open_timeout=5) as bad:
            receive(bad, "history")
            # a masked text frame, bad UTF-8
            sock.sendall(bytes([0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28]))
            assert close_code(bad) == 1007
        other.send("still fine")
        assert receive(other, "message")["text"] == "still fine"


def test_a_fragmented_message_is_one_message(server):
    with joined(server) as (ws, _):
        ws.send(["frag", "men", "ted"])
        assert receive(ws, "message")["text"] == "fragmented"


@pytest.mark.parametrize(
    "text",
    [
        "tab\there\x00nul\x07bell",
        "\u202eright-to-left\u202c",
        "emoji 👩‍👩‍👧 🎉",
        "日本語のテキスト",
        "a\r\nb",
    ],
)
def test_unusual_text_is_stored_and_echoed_intact(server, text):
    with joined(server) as (ws, _):
        ws.send(json.dumps({"type": "message", "text": text}))
        assert receive(ws, "message")["text"] == text
    assert get(server.port, "/messages")[1]["messages"][-1]["text"] == text


def test_length_is_counted_in_characters_not_bytes(server):
    with joined(server) as (ws, _):
        ws.send(json.dumps({"type": "message", "text": "é" * 2000}))  # 4000 bytes, 2000 characters
        assert len(receive(ws, "message")["text"]) == 2000
        ws.send(json.dumps({"type": "name", "name": "😀" * 32}))
        changes = presence_changes(ws, until=lambda changes: any("renamed" in c for c in changes))
        assert changes[-1]["renamed"]["to"] == "😀" * 32


@pytest.mark.parametrize(
    "since, expected",
    [("-1", None), ("abc", None), ("²", None), ("9" * 50, []), ("9" * 5000, None), ("1.5", None)],
)
def test_websocket_since_that_is_not_a_count_gets_an_error_and_the_last_50(server, since, expected):
    seed(3)
    with joined(server, since=since) as (ws, history):
        ids = [m["id"] for m in history["messages"]]
        if expected is None:
            assert ids == [1, 2, 3]
            assert "since" in receive(ws, "error")["error"]
        else:
            assert ids == expected


# Property-based fuzzing: arbitrary frames and bodies, and the invariants that must hold.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


frames = st.one_of(
    st.text(max_size=2500),
    st.binary(max_size=100),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["message", "name", "bogus", ""])},
        optional={
            "text": json_values | st.text(max_size=2100),
            "name": json_values | st.text(max_size=40),
        },
    ).map(json.dumps),
)


def test_fuzzed_frames_get_answers_and_keep_the_room_sound(server):
    # each example from an address of its own: the limits are per address, and this is no flood
    people = (f"127.0.{5 + n // 250}.{1 + n % 250}" for n in range(10_000))

    @settings(max_examples=120, deadline=None, database=None)
    @given(st.lists(frames, min_size=1, max_size=6))
    def check(batch):
        with joined(server, next(people)) as (ws, _):
            for frame in batch:
                ws.send(frame)
            ws.send("end of batch")  # every frame before it has been answered when it comes back
            receive_until(ws, lambda frames: frames and frames[-1]["text"] == "end of batch")

    check()
    assert_room_is_sound(server)
    assert get(server.port, "/health")[0] == 200


def test_fuzzed_http_requests_never_get_a_500(server):
    fields = st.dictionaries(
        st.sampled_from(["text", "name", "message", "since", "limit", "x"]), json_values
    )

    @settings(max_examples=150, deadline=None, database=None)
    @given(
        st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
        st.sampled_from(
            ["/", "/chat", "/config", "/messages", "/get_messages", "/send_message", "/health"]
        ),
        st.sampled_from(
            [
                "application/json",
                "application/x-www-form-urlencoded",
                "text/plain",
                "multipart/form-data; boundary=b",
                "application/json; charset=utf-16",
            ]
        ),
        st.one_of(st.binary(max_size=200), fields.map(lambda f: json.dumps(f).encode())),
        st.text(max_size=30).map(lambda q: urllib.parse.quote(q, safe="=&")),
        st.integers(1, 254),
    )
    def check(method, path, content_type, body, query, address):
        status, _, _ = request(
            server.port, method, f"{path}?{query}", body, content_type, source=f"127.0.2.{address}"
        )
        assert status < 500

    check()
    assert_room_is_sound(server)


@pytest.mark.parametrize(
    "target, status",
    [
        ("http://[::1", 400),  # an absolute URL whose IPv6 host has no "]"
        ("http://[x]/", 400),  # or is not an address
        ("//[x", 404),  # a path to waitress, which splits no host from "//"
    ],
    ids=["unclosed", "not-an-address", "a-path"],
)
def test_a_request_target_with_a_broken_ipv6_host_gets_an_answer_and_logs_no_error(
    server, caplog, target, status
):
    answer = raw_request(server.port, "GET", target, [("Host", f"127.0.0.1:{server.port}")])
    assert answer[0] == status
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert get(server.port, "/health")[0] == 200


def test_a_frame_with_a_number_too_long_says_so(server):
    with joined(server) as (ws, _):
        ws.send('{"type": "message", "text": "hi", "n": ' + "1" * 5000 + "}")
        error = receive(ws, "error")["error"]
    assert "cannot be read as JSON" in error and "4300 digits" in error


def test_a_frame_nested_too_deep_says_so(server):
    with joined(server) as (ws, _):
        ws.send('{"type": "message", "a": ' + "[" * 20000 + "]" * 20000 + "}")
        error = receive(ws, "error")["error"]
    assert "cannot be read as JSON" in error and "nested too deep" in error


def test_a_body_of_exactly_64_kib_is_read_and_one_byte_more_is_a_413(server):
    def body(size):
        start = b'{"text": "hi", "padding": "'
        return start + b"x" * (size - len(start) - 2) + b'"}'

    assert len(body(65536)) == chat.MAX_BODY == 65536
    assert request(server.port, "POST", "/messages", body(65536))[0] == 201
    assert request(server.port, "POST", "/messages", body(65537))[0] == 413


def test_null_is_an_absent_field_over_http(server):
    status, message = post(server.port, "/messages", {"text": "hi", "name": None, "ref": None})
    assert status == 201 and message["name"].startswith("guest-") and "ref" not in message
    status, message = post(server.port, "/send_message", {"text": None, "message": "old"})
    assert (status, message["text"]) == (201, "old")
    assert get(server.port, "/messages?limit=5")[0] == 200


def test_null_is_an_absent_field_over_websocket(server):
    with joined(server, name="alice") as (ws, _):
        ws.send(json.dumps({"type": "message", "text": "hi", "ref": None}))
        message = receive(ws, "message")
        ws.send(json.dumps({"type": "name", "name": None}))
        error = receive(ws, "error")["error"]
        ws.send(json.dumps({"type": "name"}))
        assert receive(ws, "error")["error"] == error  # null says what leaving it out says
    assert message["text"] == "hi" and "ref" not in message


@pytest.mark.parametrize(
    "content_type, status",
    [
        ("multipart/form-data", 400),
        ("multipart/form-data; boundary=", 400),
        ("application/xml", 415),
        ("image/png", 415),
        ("application/octet-stream", 415),
    ],
)
def test_a_body_the_chat_cannot_read_is_a_415_or_400_with_the_json_error(
    server, content_type, status
):
    got, answer_type, body = request(server.port, "POST", "/messages", b"text=hi", content_type)
    assert (got, answer_type) == (status, "application/json; charset=utf-8")
    assert json.loads(body)["errors"]["body"]
    assert get(server.port, "/messages")[1]["messages"] == []
