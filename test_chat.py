"""The contract (docs/protocol.md), checked against real servers and real clients.

Most tests start the servers in this process on free ports (fast); the command line,
signals and exit codes are tested on `python chat.py` run as a subprocess.
"""

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import functools
import http.client
import json
import logging
import os
import queue
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.parse
from pathlib import Path

import chat  # before hug: chat.py keeps hug away from NumPy 2
import engines

# isort: split
import hug
import pytest
import segno
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as async_connect
from websockets.asyncio.server import serve
from websockets.sync.client import connect

from chromium import CHROMIUM, CHROMIUM_FLAGS

CHAT_PY = Path(__file__).with_name("chat.py")


# --- Helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def running_servers(host="127.0.0.1", **options):
    """The chat on free ports in this process; stopped after the block, and no thread of it
    may outlive stop()."""
    threads_before = set(threading.enumerate())
    servers = chat.Servers(host, 0, 0, **options)
    try:
        yield servers
    finally:
        servers.stop()
    assert not threads_started_since(threads_before), "a server thread outlived stop()"


def threads_started_since(before):
    """The threads started since `before` that still run, once the test's own websocket clients
    are done: a sync client's keepalive thread ends just after its connection closed (close()
    does not join it), so under load it may still be finishing when the test checks."""
    for thread in set(threading.enumerate()) - before:
        if thread.name.endswith("(keepalive)"):
            thread.join(5)
    return set(threading.enumerate()) - before


@pytest.fixture
def server():
    with running_servers(history=1000) as servers:
        yield servers


@pytest.fixture
def small_server():
    with running_servers(history=3) as servers:
        yield servers


def run_async(coroutine):
    """asyncio.run(coroutine) in a thread of its own, and its result.

    Playwright's sync API keeps an event loop running in the main thread for the whole
    session, so asyncio.run() there fails once any browser test has run.
    """
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="test-asyncio") as thread:
        return thread.submit(asyncio.run, coroutine).result()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_nobody_else_picks():
    """A free port below the kernel's ephemeral range, for a server started some time after the
    port was chosen: a port from free_port() may be handed meanwhile to another socket that
    binds port 0 or connects out (a chat process, its Redis client)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:  # not Linux
        return free_port()
    for port in random.sample(range(10_000, low), 100):
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind(("127.0.0.1", port))
            return port
    return free_port()


class Response(collections.namedtuple("Response", "status content_type body")):
    """What request() answers: unpacks as (status, content type, body); `.headers` has them all."""

    headers: http.client.HTTPMessage


def request(
    port, method, path, body=None, content_type="application/json", headers=(), source="127.0.0.1"
):
    """One HTTP request from address `source`; returns a Response.

    Posts are rate-limited per client address: tests that post a lot use several
    loopback addresses (127.0.0.0/8 is all this machine), as many people would.
    """
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=10, source_address=(source, 0)
    )
    try:
        connection.request(
            method, path, body=body, headers={"Content-Type": content_type, **dict(headers)}
        )
        answer = connection.getresponse()
        response = Response(answer.status, answer.getheader("Content-Type"), answer.read())
        response.headers = answer.headers
        return response
    finally:
        connection.close()


def get(port, path):
    status, _, body = request(port, "GET", path)
    return status, json.loads(body)


def post(port, path, body, content_type="application/json", source="127.0.0.1"):
    status, _, data = request(port, "POST", path, body, content_type, source=source)
    return status, json.loads(data)


def stored_texts(port):
    """The texts the room keeps, oldest first (up to 1000)."""
    return [m["text"] for m in get(port, "/messages?limit=1000")[1]["messages"]]


def wait_until(condition, timeout=10, what="the condition"):
    """Polls `condition()` until it is true, or fails after `timeout` seconds."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        threading.Event().wait(0.02)
    raise AssertionError(f"{what} never came true within {timeout} s")


def wait_for_health(port, timeout=10, **expected):
    """Polls /health until it shows `expected` (say clients=0), or fails after `timeout`."""

    health = {}

    def shows_expected():
        health.update(get(port, "/health")[1])
        return all(health[key] == value for key, value in expected.items())

    try:
        wait_until(shows_expected, timeout, what=f"/health showing {expected}")
    except AssertionError as never:
        raise AssertionError(f"{never}; it last showed {health}") from None


def seed(count, name="seed"):
    """Put `count` messages m1, m2, ... in the room directly, past any rate limit."""

    async def post_all():
        for n in range(1, count + 1):
            await chat.room.post(name, f"m{n}")

    chat.ask_room(post_all())


def ws_url(servers, path="/", **query):
    from urllib.parse import urlencode

    return f"ws://127.0.0.1:{servers.ws_port}{path}" + (f"?{urlencode(query)}" if query else "")


def receive(ws, kind, timeout=5):
    """The next frame of type `kind`, skipping the others (presence comes and goes)."""
    while True:
        frame = json.loads(ws.recv(timeout=timeout))
        if frame["type"] == kind:
            return frame


@contextlib.contextmanager
def joined(servers, source="127.0.0.1", **query):
    """A sync websocket client in the room, from address `source`, and the history it got first
    (all its pieces).

    max_queue=None: it reads everything the server sends at once, so a test that leaves
    frames unread does not look like a slow reader to the server.
    """
    url = ws_url(servers, **query)
    with connect(url, open_timeout=5, max_queue=None, source_address=(source, 0)) as ws:
        yield ws, receive_history(ws)


def receive_history(ws):
    """The history pieces as one frame: the last piece's fields, every piece's messages."""
    history = receive(ws, "history")
    while history["more"]:
        piece = receive(ws, "history")
        history = {**piece, "messages": history["messages"] + piece["messages"]}
    return history


def receive_until(ws, done, kinds=("message",), timeout=5):
    """Frames of the given kinds, in order, until `done(frames)` is true; others are skipped."""
    frames = []
    while not done(frames):
        frame = json.loads(ws.recv(timeout=timeout))
        if frame["type"] in kinds:
            frames.append(frame)
    return frames


def presence_frames(ws, count):
    """Presence frames until they carry `count` changes in all (several may share a frame)."""
    return receive_until(ws, lambda frames: len(all_changes(frames)) >= count, ("presence",))


def presence_changes(ws, until):
    """The changes of presence frames, read until `until(changes so far)` holds."""
    return all_changes(receive_until(ws, lambda frames: until(all_changes(frames)), ("presence",)))


def all_changes(frames):
    """Every change that presence frames carry, in order."""
    return [change for frame in frames for change in frame["changes"]]


def close_code(ws, timeout=5):
    """Reads until the server closes the connection; the close code the server sent."""
    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=timeout)
    return closed.value.rcvd.code


def refused_handshake(url, **options):
    """The HTTP status with which the server refuses a websocket handshake at `url`."""
    with (
        pytest.raises(websockets.exceptions.InvalidStatus) as refused,
        connect(url, open_timeout=5, **options),
    ):
        pass
    return refused.value.response.status_code


BURST, PER_SECOND = 20, 10  # the README's rate limit: 20 messages at once, then 10 a second
PRESENCE_EVERY = 0.25  # seconds: at most one presence frame this often


def most_allowed(seconds):
    """The most messages the rate limit lets through in `seconds`: the burst and its refill."""
    return BURST + PER_SECOND * seconds


# --- HTTP routes -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/chat"])
def test_page_is_served_as_utf8_html(server, path):
    status, content_type, body = request(server.port, "GET", path)
    assert status == 200
    assert content_type == "text/html; charset=utf-8"
    assert b'id="chat-box"' in body


def test_page_policy_allows_only_its_own_script_style_and_websocket(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/")
    policy = connection.getresponse().getheader("Content-Security-Policy")
    connection.close()
    assert "default-src 'none'" in policy
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    assert f"connect-src 'self' ws://127.0.0.1:{server.ws_port};" in policy


def test_config_tells_the_page_the_websocket_port(server):
    status, config = get(server.port, "/config")
    assert status == 200
    assert config["ws_port"] == server.ws_port


def test_post_answers_201_with_the_stored_message(server):
    status, message = post(server.port, "/messages", {"name": "alice", "text": "  hi  "})
    assert status == 201
    assert message["id"] == 1 and message["name"] == "alice" and message["text"] == "hi"
    assert message["ts"].endswith("Z") and message["ts"][10] == "T"


def test_post_without_name_gets_a_guest_name(server):
    _, message = post(server.port, "/messages", {"text": "hello"})
    assert message["name"].startswith("guest-")


def test_form_post_keeps_commas_and_utf8(server):
    status, message = post(
        server.port, "/messages", "name=j%C3%B6rg&text=a,b,c", "application/x-www-form-urlencoded"
    )
    assert status == 201
    assert (message["name"], message["text"]) == ("jörg", "a,b,c")


def test_get_messages_since_and_limit_oldest_first(server):
    for n in range(1, 6):
        post(server.port, "/messages", {"text": f"m{n}"})
    _, body = get(server.port, "/messages?since=1&limit=3")
    assert [m["text"] for m in body["messages"]] == ["m2", "m3", "m4"]
    _, body = get(server.port, "/messages")
    assert [m["id"] for m in body["messages"]] == [1, 2, 3, 4, 5]


def test_seed_tutorial_aliases_send_message_and_get_messages(server):
    status, message = post(
        server.port, "/send_message", "message=old+style", "application/x-www-form-urlencoded"
    )
    assert status == 201 and message["text"] == "old style"
    _, body = get(server.port, "/get_messages?since=0")
    assert [m["text"] for m in body["messages"]] == ["old style"]


def test_health_counts_clients_and_messages(server):
    post(server.port, "/messages", {"text": "one"})
    with connect(ws_url(server), open_timeout=5) as ws:
        receive(ws, "presence")  # joined: the room counts it now
        status, health = get(server.port, "/health")
        assert status == 200
        assert health["status"] == "ok" and health["clients"] == 1 and health["messages"] == 1


def test_unknown_url_is_a_plain_404(server):
    status, _, body = request(server.port, "GET", "/nope")
    assert status == 404
    assert b"documentation" not in body


def test_history_keeps_the_newest_and_ids_keep_counting(small_server):
    for n in range(1, 6):
        post(small_server.port, "/messages", {"text": f"m{n}"})
    _, body = get(small_server.port, "/messages")
    assert [m["id"] for m in body["messages"]] == [3, 4, 5]


# --- HTTP bad input: 400 with a JSON body that names the field -------------------------

BAD_POSTS = [
    ({}, "text", "not supplied"),
    ({"text": ""}, "text", "text is empty"),
    ({"text": "   \n\t "}, "text", "text is empty"),
    ({"text": "x" * 2001}, "text", "longer than 2000"),
    ({"text": 42}, "text", "must be a string"),
    ({"text": {"x": 1}}, "text", "must be a string"),
    ({"text": ["a"]}, "text", "must be a string"),
    ({"text": None}, "text", "not supplied"),  # null is an absent field
    ({"text": "\ud800"}, "text", "not valid Unicode"),
    ({"text": "hi", "name": "n" * 33}, "name", "longer than 32"),
    ({"text": "hi", "name": ""}, "name", "empty"),
    ({"text": "hi", "name": 7}, "name", "must be a string"),
    ({"text": "hi", "name": "a\nb"}, "name", "control characters"),
]


@pytest.mark.parametrize("body, field, rule", BAD_POSTS)
def test_bad_post_is_a_400_naming_the_field_and_rule(body, field, rule, monkeypatch):
    # hug.test calls chat's routes in this process, without servers: the policy of no room key,
    # not the one the last test's servers left behind (say keyed_server's, a 401)
    monkeypatch.setattr(chat, "policy", chat.Policy())
    # hug.test's own host is falconframework.org
    headers = {"content-type": "application/json", "host": "127.0.0.1"}
    response = hug.test.post(chat, "/messages", json.dumps(body), headers=headers)
    assert response.status == hug.HTTP_400
    assert rule in response.data["errors"][field]


def test_exactly_2000_characters_of_emoji_are_accepted(server):
    status, message = post(server.port, "/messages", {"text": "😀" * 2000})
    assert status == 201 and len(message["text"]) == 2000


@pytest.mark.parametrize(
    "body, content_type, rule",
    [
        ("{not json", "application/json", "not valid JSON"),
        (b"\xff\xfe", "application/json", "not valid UTF-8"),
        ("[" * 20000, "application/json", "not valid JSON"),
        (b"text=\xff", "application/x-www-form-urlencoded", "not valid UTF-8"),
        (b"\xff", "text/plain; charset=bogus-charset", "not valid UTF-8"),
    ],
)
def test_unreadable_body_is_a_400_not_a_500(server, body, content_type, rule):
    status, _, data = request(server.port, "POST", "/messages", body, content_type)
    assert status == 400
    assert rule in json.loads(data)["errors"]["body"]
    assert get(server.port, "/messages")[1]["messages"] == []


def test_a_bogus_charset_is_ignored_because_json_is_utf8(server):
    body = '{"text": "hé"}'.encode()
    status, _, data = request(
        server.port, "POST", "/messages", body, "application/json; charset=bogus-charset"
    )
    assert status == 201 and json.loads(data)["text"] == "hé"


@pytest.mark.parametrize(
    "query, field",
    [
        ("since=x", "since"),
        ("since=-1", "since"),
        ("since=%C2%B2", "since"),
        ("since=" + "9" * 5000, "since"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=" + "1" * 5000, "limit"),
        ("limit=%C2%B2", "limit"),
    ],
)
def test_bad_query_is_a_400_naming_the_parameter(server, query, field):
    status, body = get(server.port, f"/messages?{query}")
    assert status == 400
    assert field in body["errors"]


def test_huge_since_is_just_nothing_new(server):
    post(server.port, "/messages", {"text": "hi"})
    assert get(server.port, "/messages?since=" + "9" * 40) == (200, {"messages": []})


def test_body_over_64_kib_is_refused_with_413(server):
    status, _, _ = request(server.port, "POST", "/messages", {"text": "x" * 70000})
    assert status == 413


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


# --- The websocket room ----------------------------------------------------------------


def test_history_comes_first_with_the_last_50(server):
    seed(60)
    with joined(server) as (_, history):
        assert [m["id"] for m in history["messages"]] == list(range(11, 61))


def test_since_resumes_with_every_kept_message_after_it(server):
    seed(60)
    with joined(server, since=5) as (_, history):
        assert [m["id"] for m in history["messages"]] == list(range(6, 61))


def test_message_reaches_everyone_including_the_sender(server):
    with joined(server, name="alice") as (alice, _), joined(server, name="bob") as (bob, _):
        alice.send(json.dumps({"type": "message", "text": "hello bob"}))
        for ws in (alice, bob):
            message = receive(ws, "message")
            assert (message["name"], message["text"], message["id"]) == ("alice", "hello bob", 1)


def test_http_post_is_broadcast_to_websocket_clients(server):
    with joined(server) as (ws, _):
        post(server.port, "/messages", {"name": "curl", "text": "from http"})
        message = receive(ws, "message")
        assert (message["name"], message["text"]) == ("curl", "from http")


def test_plain_text_frame_is_a_message(server):
    with joined(server, name="cli") as (ws, _):
        ws.send("just typing")
        assert receive(ws, "message")["text"] == "just typing"
        ws.send("[1, 2]")  # JSON, but not an object
        assert receive(ws, "message")["text"] == "[1, 2]"


def test_presence_on_join_rename_and_leave(server):
    with joined(server, name="alice") as (alice, history):
        assert history["online"] == []  # who was there before her
        joined_alone = receive(alice, "presence")
        assert joined_alone == {
            "type": "presence",
            "joined": "alice",
            "changes": [{"joined": "alice"}],
        }
        with joined(server, name="bob") as (bob, bobs_history):
            presence_changes(bob, until=lambda changes: {"joined": "bob"} in changes)
            bob.send(json.dumps({"type": "name", "name": "robert"}))  # after his join went out
            changes = presence_changes(alice, until=lambda changes: len(changes) == 2)
            assert changes == [{"joined": "bob"}, {"renamed": {"from": "bob", "to": "robert"}}]
            assert bobs_history["online"] == ["alice"]
        left = receive(alice, "presence")
        assert left["left"] == "robert" and "online" not in left


def test_history_online_and_the_presence_changes_after_it_add_up_to_who_is_there(server):
    with joined(server, name="alice") as (alice, _):
        receive(alice, "presence")  # her join went out: the next changes wait up to 0.25 s
        with joined(server, name="bob"), joined(server, name="carol") as (carol, history):
            changes = presence_changes(carol, until=lambda changes: {"joined": "carol"} in changes)
            online = history["online"] + [change["joined"] for change in changes]
            assert sorted(online) == ["alice", "bob", "carol"]  # bob's join was still waiting: once


def test_a_burst_of_joins_is_sent_as_few_presence_frames(server):
    with joined(server, name="watcher") as (watcher, _):
        receive(watcher, "presence")  # its own join: the next changes wait for the 0.25 s window
        began = time.monotonic()
        with contextlib.ExitStack() as stack:
            for n in range(10):
                stack.enter_context(joined(server, name=f"p{n}"))
            frames = presence_frames(watcher, 10)
            took = time.monotonic() - began
    assert all_changes(frames) == [{"joined": f"p{n}"} for n in range(10)]
    assert len(frames) <= 1 + took / PRESENCE_EVERY  # one frame, then at most one every 0.25 s


def test_messages_after_rename_carry_the_new_name(server):
    with joined(server, name="bob") as (ws, _):
        ws.send(json.dumps({"type": "name", "name": "robert"}))
        ws.send(json.dumps({"type": "message", "text": "hi"}))
        assert receive(ws, "message")["name"] == "robert"


def test_echo_sends_each_frame_back(server):
    with connect(ws_url(server, "/echo"), open_timeout=5) as ws:
        ws.send("ping")
        assert ws.recv(timeout=5) == "ping"
        ws.send(b"\x00\x01")
        assert ws.recv(timeout=5) == b"\x00\x01"


def test_history_frame_tells_the_client_its_name_and_room(server):
    with joined(server) as (_, history):
        assert history["name"].startswith("guest-")
        assert history["room"] == get(server.port, "/config")[1]["room"]


def test_since_from_another_room_is_ignored_and_gives_the_last_50(server):
    for n in range(1, 4):
        post(server.port, "/messages", {"text": f"m{n}"})
    with joined(server, since=2, room="a-room-before-a-restart") as (_, history):
        assert [m["id"] for m in history["messages"]] == [1, 2, 3]
    with joined(server, since=2, room=get(server.port, "/config")[1]["room"]) as (_, history):
        assert [m["id"] for m in history["messages"]] == [3]


def test_chat_path_is_the_room_too(server):
    with connect(ws_url(server, "/chat"), open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "history"


def test_unknown_path_is_refused_with_404(server):
    assert refused_handshake(ws_url(server, "/nope")) == 404


@pytest.mark.parametrize(
    "frame, error",
    [
        (json.dumps({"type": "message", "text": ""}), "text is empty"),
        (json.dumps({"type": "message", "text": "x" * 2001}), "longer than 2000"),
        (json.dumps({"type": "message"}), "must be a string"),
        (json.dumps({"type": "dance"}), "unknown type"),
        (json.dumps({"text": "no type"}), "unknown type"),
        (json.dumps({"type": "name", "name": "n" * 33}), "longer than 32"),
        ("   ", "text is empty"),
        (b"\x00binary", "binary"),
        ("[" * 30000, "longer than 2000"),
    ],
)
def test_bad_frame_gets_an_error_and_the_connection_stays(server, frame, error):
    with joined(server) as (ws, _):
        ws.send(frame)
        assert error in receive(ws, "error")["error"]
        ws.send("still here")
        assert receive(ws, "message")["text"] == "still here"
    assert get(server.port, "/messages")[1]["messages"][-1]["text"] == "still here"


def test_bad_query_parameters_get_an_error_and_a_guest_name(server):
    with joined(server, name="n" * 40, since="abc") as (ws, _):
        errors = {receive(ws, "error")["error"] for _ in range(2)}
        assert any("name" in e for e in errors) and any("since" in e for e in errors)
        ws.send("hi")
        assert receive(ws, "message")["name"].startswith("guest-")


def test_frame_over_64_kib_closes_with_1009(server):
    with joined(server) as (ws, _):
        ws.send("x" * (64 * 1024 + 1))
        assert close_code(ws) == 1009


def test_more_than_20_at_once_gets_too_fast_errors_and_nothing_is_stored(server):
    with joined(server) as (ws, _):
        began = time.monotonic()
        for n in range(40):
            ws.send(f"m{n}")
        frames = receive_until(ws, lambda frames: len(frames) == 40, kinds=("message", "error"))
        took = time.monotonic() - began
    messages = [f for f in frames if f["type"] == "message"]
    errors = [f for f in frames if f["type"] == "error"]
    assert [m["text"] for m in messages[:BURST]] == [f"m{n}" for n in range(BURST)]  # the burst
    assert len(messages) <= most_allowed(took)  # and what refilled meanwhile, no more
    assert len(errors) == 40 - len(messages) and all("too fast" in e["error"] for e in errors)
    assert len(get(server.port, "/messages")[1]["messages"]) == len(messages)


async def collect_messages(ws, count):
    """The ids and texts of the next `count` messages on an asyncio client."""
    ids, texts = [], []
    while len(ids) < count:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame["type"] == "message":
            ids.append(frame["id"])
            texts.append(frame["text"])
    return ids, texts


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


# --- One order for everyone ------------------------------------------------------------

EACH = 20  # messages per sender, all at once: within the burst, so no rate limit applies


def chat_from_everywhere(ws_senders, listeners, http_senders):
    """Everyone joins first; then each websocket sender (a URL) sends EACH messages and each
    HTTP sender (a port and a source address: the HTTP limit is per address) posts EACH, all
    at once. Returns the ids and texts that every websocket client received."""
    total = (len(ws_senders) + len(http_senders)) * EACH

    async def websocket_sender(ws, n):
        for i in range(EACH):
            await ws.send(json.dumps({"type": "message", "text": f"ws{n}-{i}"}))

    def http_sender(n, port, source):
        for i in range(EACH):
            assert (
                post(
                    port, "/messages", {"name": f"http{n}", "text": f"http{n}-{i}"}, source=source
                )[0]
                == 201
            )

    async def run():
        clients = [  # each from an address of its own: the rate limit is per address
            await async_connect(url, max_queue=None, local_addr=(f"127.0.1.{n}", 0))
            for n, url in enumerate(ws_senders + listeners, 1)
        ]
        for ws in clients:  # everyone is in the room before the first message
            assert json.loads(await ws.recv())["type"] == "history"
        received = asyncio.gather(*(collect_messages(ws, total) for ws in clients))
        await asyncio.gather(
            *(websocket_sender(ws, n) for n, ws in enumerate(clients[: len(ws_senders)])),
            *(asyncio.to_thread(http_sender, n, *sender) for n, sender in enumerate(http_senders)),
        )
        results = await asyncio.wait_for(received, 30)
        for ws in clients:
            await ws.close()
        return results

    return run_async(run())


def assert_everyone_got(results, stored):
    """Every client got the stored messages, ids 1, 2, 3..., in the stored order, and each
    sender's messages keep the order it sent them in."""
    texts = [m["text"] for m in stored]
    assert [m["id"] for m in stored] == list(range(1, len(stored) + 1))
    for ids, received in results:
        assert ids == [m["id"] for m in stored]
        assert received == texts
    for sender in {text.split("-")[0] for text in texts}:
        assert [t for t in texts if t.startswith(f"{sender}-")] == [
            f"{sender}-{i}" for i in range(EACH)
        ]


def test_concurrent_websocket_and_http_senders_give_everyone_the_same_order(server):
    ws_senders = [ws_url(server, name=f"sender{n}") for n in range(5)]
    listeners = [ws_url(server, name=f"listener{n}") for n in range(3)]
    http_senders = [(server.port, f"127.0.0.{10 + n}") for n in range(5)]
    results = chat_from_everywhere(ws_senders, listeners, http_senders)
    assert_everyone_got(results, get(server.port, "/messages?limit=1000")[1]["messages"])


# --- Prepared frames: one serialized frame written to everyone (send_prepared) -------
# The slow-reader guard rides on the same transport.write(): see
# test_a_reader_that_stops_reading_is_dropped_and_the_others_get_everything under Hardening.


def read_frame(stream):
    """One frame as the server sent it (unmasked): (opcode, payload), or None at the end."""
    head = stream.read(2)
    if not head:
        return None
    length = head[1] & 0x7F
    if length >= 126:
        length = int.from_bytes(stream.read(2 if length == 126 else 8), "big")
    return head[0] & 0x0F, stream.read(length)


def client_connection(name):
    """The server's side of the client called `name`; only for code running in the loop."""
    return next(connection for connection, who in chat.room.clients.items() if who == name)


def test_nothing_is_sent_after_the_close_frame_of_a_shutdown(server):
    with silent_client(server.ws_port) as sock:  # a raw socket: every byte the server sends
        stream = sock.makefile("rb")
        assert b'"history"' in read_frame(stream)[1]  # in the room
        # what stop() does first: 1001 to all
        server.loop.call_soon_threadsafe(server.ws_server.close)
        while (frame := read_frame(stream))[0] != 0x8:
            pass
        assert int.from_bytes(frame[1][:2], "big") == 1001
        # it waits for our answer, still in the room
        assert get(server.port, "/health")[1]["clients"] == 1
        assert post(server.port, "/messages", {"text": "posted during the shutdown"})[0] == 201
        # our close, masked
        sock.sendall(bytes([0x88, 0x82, 0, 0, 0, 0]) + (1001).to_bytes(2, "big"))
        assert read_frame(stream) is None


def test_a_message_does_not_cut_into_a_fragmented_message_being_sent(server):
    async def start_fragmented_send():
        """Send "frag" + "mented" to one client, and stop between the two fragments."""
        first_sent, go_on = asyncio.Event(), asyncio.Event()

        async def fragments():
            yield "frag"
            first_sent.set()
            await go_on.wait()
            yield "mented"

        sent = asyncio.create_task(client_connection("fragments").send(fragments()))
        await first_sent.wait()
        return go_on, sent

    with joined(server, name="fragments") as (ws, _):
        go_on, sent = chat.ask_room(start_fragmented_send())
        assert post(server.port, "/messages", {"text": "posted in between"})[0] == 201
        server.loop.call_soon_threadsafe(go_on.set)
        while (frame := ws.recv(timeout=5)).startswith("{"):
            pass  # presence or history
        assert frame == "fragmented"
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(sent, 5), server.loop).result(timeout=10)
        post(server.port, "/messages", {"text": "after"})
        while receive(ws, "message")["text"] != "after":
            pass


def test_a_client_that_negotiated_compression_gets_compressed_frames():
    """The chat serves with compression=None; send_prepared() still honours it where it is on."""

    async def scenario():
        connected = asyncio.get_running_loop().create_future()

        async def handler(connection):
            connected.set_result(connection)
            await connection.wait_closed()

        async with serve(handler, "127.0.0.1", 0) as server:  # deflate by default
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n".encode()
            )
            assert b"permessage-deflate" in await reader.readuntil(b"\r\n\r\n")
            chat.send_prepared(
                [await connected], json.dumps({"type": "message", "text": "x" * 1000})
            )
            head = await reader.readexactly(2)
            writer.close()
        return head

    head = run_async(asyncio.wait_for(scenario(), 10))
    assert head[0] & 0x40, "RSV1 is not set: the frame was not compressed"
    assert head[1] & 0x7F < 126, "1000 bytes of x compress to a few"


# --- Start-up and shutdown -------------------------------------------------------------


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_stop_closes_clients_with_1001_and_leaves_no_thread_or_socket():
    threads_before, fds_before = set(threading.enumerate()), open_fds()
    servers = chat.Servers("127.0.0.1", 0, 0)
    with joined(servers) as (ws, _):
        post(servers.port, "/messages", {"text": "hi"})
        servers.stop()
        assert close_code(ws) == 1001
    assert not threads_started_since(threads_before)
    assert open_fds() <= fds_before


class ChatProcess:
    """`python chat.py ARGS` in a subprocess, with its printed ports read back."""

    script = CHAT_PY  # a workshop step is run the same way (StepProcess)

    def __init__(self, *args, **popen):
        self.process = subprocess.Popen(
            [sys.executable, str(self.script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self):
        for line in self.process.stdout:
            self.lines.put(line)

    def urls(self):
        page, websocket = self.lines.get(timeout=15), self.lines.get(timeout=5)
        page_url, ws_url = (urllib.parse.urlsplit(line.split()[-1]) for line in (page, websocket))
        self.port, self.ws_port = page_url.port, ws_url.port
        self.key = urllib.parse.parse_qs(page_url.query).get("key", [None])[0]  # the room key
        return page, websocket

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.fixture
def chat_process():
    started = []

    def start(*args, **popen):
        started.append(ChatProcess(*args, **popen))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def test_prints_the_page_and_websocket_urls_with_real_ports(chat_process):
    process = chat_process("--port", "0", "--ws-port", "0")
    page, websocket = process.urls()
    assert page.startswith("Chat page:  http://127.0.0.1:") and page.endswith("/\n")
    assert websocket.startswith("Websocket:  ws://127.0.0.1:")
    assert process.port > 0 and process.ws_port > 0
    assert request(process.port, "GET", "/health")[0] == 200


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_both_servers_clients_get_1001_exit_0(chat_process, stop_signal):
    process = chat_process("--port", "0", "--ws-port", "0")
    process.urls()
    with connect(f"ws://127.0.0.1:{process.ws_port}/", open_timeout=5) as ws:
        receive(ws, "history")
        process.process.send_signal(stop_signal)
        assert close_code(ws) == 1001
    assert process.process.wait(5) == 0
    assert "Traceback" not in process.process.stderr.read()


@pytest.mark.parametrize("which", ["--port", "--ws-port"])
def test_port_in_use_is_one_line_and_exit_2(chat_process, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        other = "--ws-port" if which == "--port" else "--port"
        process = chat_process(which, str(taken.getsockname()[1]), other, "0")
        assert process.process.wait(15) == 2
        error = process.process.stderr.read()
    assert error.count("\n") == 1 and "in use" in error and "Traceback" not in error


@pytest.mark.parametrize(
    "args", [["--port", "http"], ["--port", "70000"], ["--history", "0"], ["--bogus"]]
)
def test_bad_flag_is_one_line_and_exit_2(chat_process, args):
    process = chat_process(*args)
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and error.startswith("chat.py: error:")


# --- Hardening: clients that misbehave on purpose -------------------------------------


def test_http_posts_past_the_limit_get_429_and_other_addresses_carry_on(server):
    began = time.monotonic()
    responses = [
        request(server.port, "POST", "/messages", {"text": f"flood {n}"}, source="127.0.0.5")
        for n in range(40)
    ]
    took = time.monotonic() - began
    assert [response.status for response in responses[:BURST]] == [201] * BURST  # the burst
    stored = [response for response in responses if response.status == 201]
    refused = [response for response in responses if response.status == 429]
    assert len(stored) <= most_allowed(took) and len(stored) + len(refused) == 40
    assert all("too fast" in json.loads(response.body)["errors"]["text"] for response in refused)
    assert post(server.port, "/messages", {"text": "someone else"}, source="127.0.0.6")[0] == 201
    assert len(get(server.port, "/messages")[1]["messages"]) == len(stored) + 1


def test_429_says_retry_after_1_second(server):
    for n in range(BURST):
        assert post(server.port, "/messages", {"text": f"burst {n}"}, source="127.0.0.7")[0] == 201
    response = request(
        server.port, "POST", "/messages", {"text": "one too many"}, source="127.0.0.7"
    )
    assert response.status == 429
    assert response.headers["Retry-After"] == "1"


def test_a_flooding_websocket_does_not_stop_anyone_else(server):
    with (
        joined(server, name="flood") as (flood, _),
        joined(server, "127.0.0.8", name="calm") as (calm, _),
    ):
        began = time.monotonic()
        for n in range(60):
            flood.send(f"flood {n}")
        calm.send("calm one")
        first = receive_until(calm, lambda frames: frames and frames[-1]["text"] == "calm one")[:-1]
        # only what the flood may send came first
        assert len(first) <= most_allowed(time.monotonic() - began)
    stored = stored_texts(server.port)
    took = time.monotonic() - began
    assert "calm one" in stored
    assert len(stored) - 1 <= most_allowed(took)  # the flood got its burst and the refill, no more


def silent_client(port):
    """A raw websocket handshake on a socket with a tiny receive buffer that then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /?name=silent HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)  # byte by byte: leave every frame after the handshake unread
    assert response.startswith(b"HTTP/1.1 101")
    return sock


def test_a_reader_that_stops_reading_is_dropped_and_the_others_get_everything(server):
    total, batch, text = 4000, 100, "x" * 2000  # 8 MB: past the kernel's buffers and our 1 MiB
    peak = [0]

    async def post_batch():
        for _ in range(batch):
            await chat.room.post("bulk", text)
            peak[0] = max(
                peak[0], *(c.transport.get_write_buffer_size() for c in chat.room.clients)
            )

    def ids(frames):
        return [frame["id"] for frame in frames if frame["type"] == "message"]

    def left(frames):
        return [
            change["left"]
            for frame in frames
            if frame["type"] == "presence"
            for change in frame["changes"]
            if "left" in change
        ]

    with silent_client(server.ws_port), joined(server, name="reader") as (reader, _):
        frames = []
        for _ in range(total // batch):  # the reader reads each batch before the next
            chat.ask_room(post_batch())
            frames += receive_until(
                reader, lambda new: len(ids(new)) == batch, ("message", "presence"), timeout=10
            )
        assert ids(frames) == list(range(1, total + 1))
        # the silent one's `left` may come after the last message: wait for it
        frames += receive_until(reader, lambda new: left(frames + new), ("presence",), timeout=10)
        assert left(frames) == ["silent"]
        assert get(server.port, "/health")[1]["clients"] == 1
    # what the server held for the silent one stayed bounded
    assert peak[0] <= chat.MAX_QUEUED + 4096


def test_a_client_that_never_answers_pings_is_dropped(monkeypatch):
    monkeypatch.setattr(chat, "PING_INTERVAL", 0.2)  # 20 s in real life; the mechanism is the same
    monkeypatch.setattr(chat, "PING_TIMEOUT", 0.3)
    with running_servers() as servers, silent_client(servers.ws_port):
        wait_for_health(servers.port, timeout=5, clients=0)


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


def assert_room_is_sound(server):
    messages = get(server.port, "/messages?limit=1000")[1]["messages"]
    ids = [m["id"] for m in messages]
    assert ids == sorted(set(ids))
    for message in messages:
        assert 1 <= len(message["text"]) <= 2000 and message["text"] == message["text"].strip()
        assert 1 <= len(message["name"]) <= 32 and message["name"] == message["name"].strip()


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


# Hostile headers, and the command line keeps its word (issue 22): what a client controls in
# its headers (Host forms, Content-Type parameters and case, headers sent twice, HEAD and
# OPTIONS). No answer is a 500, and none leaves a traceback in the log.


def raw_request(port, method, path, headers, body=b""):
    """One HTTP/1.1 request written byte for byte (headers in order, repeats kept); returns
    the status and the whole answer as sent."""
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + b"Connection: close\r\n\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def raw_handshake(ws_port, headers, path="/", method="GET"):
    """A websocket handshake with exactly these headers; the answer's status and body."""
    key = base64.b64encode(os.urandom(16)).decode()
    fixed = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
    ]
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in [*headers, *fixed])
    with socket.create_connection(("127.0.0.1", ws_port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
        if not answer.startswith(b"HTTP/1.1 101"):
            while chunk := sock.recv(65536):  # the body, up to the server's close
                answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split(b" ", 2)[1]), rest.partition(b"\r\n\r\n")[2]


def tracebacks(caplog):
    """Log records that carry a traceback or an error: the symptom of an unhandled exception."""
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


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


@pytest.mark.parametrize(
    "name", ["localhost.", "chat.localhost.", "chat.lan.", "LocalHost.", "CHAT.LAN"]
)
def test_a_page_opened_at_a_name_with_a_trailing_dot_or_capitals_can_post_and_connect(name):
    with running_servers(allowed_hosts=["chat.lan"]) as servers:
        origin = f"http://{name}:{servers.port}"
        headers = {"Host": f"{name}:{servers.port}", "Origin": origin}
        status, _, _ = request(servers.port, "POST", "/messages", {"text": "hi"}, headers=headers)
        assert status == 201
        with handshake(servers.ws_port, name, origin=origin) as ws:
            assert [m["text"] for m in receive(ws, "history")["messages"]] == ["hi"]


def test_browser_a_page_opened_at_localhost_with_a_trailing_dot_goes_online_and_posts(
    server, open_page
):
    from playwright.sync_api import expect

    page = open_page(url=f"http://localhost.:{server.port}/")  # waits for "online"
    say(page, "from localhost.")
    expect(texts(page)).to_have_text(["from localhost."])
    assert stored_texts(server.port) == ["from localhost."]


def test_stop_closes_a_handshake_that_never_comes_instead_of_waiting_for_it(monkeypatch):
    monkeypatch.setattr(chat, "OPEN_TIMEOUT", 60)  # far longer than stop() may take
    threads_before = set(threading.enumerate())
    servers = chat.Servers("127.0.0.1", 0, 0)
    with socket.create_connection(("127.0.0.1", servers.ws_port), timeout=10) as idle:
        # connections are accepted in order: once a later one is in, the idle one is too
        with joined(servers) as (ws, _):
            servers.stop()  # raised RoomUnavailable: the loop was still waiting for the idle one
            assert close_code(ws) == 1001
        assert idle.recv(1) == b""  # closed by the server
    assert not threads_started_since(threads_before)


def test_a_host_that_does_not_resolve_is_one_line_and_exit_2(chat_process):
    process = chat_process("--host", "999.1.1.1", "--port", "0", "--ws-port", "0")
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and error.startswith("chat.py: error:") and "999.1.1.1" in error


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


def test_browser_trims_white_space_exactly_as_the_server_does(server, open_page):
    page = open_page(server.port)
    page_trims = page.evaluate(
        """() => {
            const trims = [];
            for (let c = 0; c <= 0x10ffff; c++) {
                if (trimmed(String.fromCodePoint(c)) === "") trims.push(c);
            }
            return trims;
        }"""
    )
    server_trims = [c for c in range(0x110000) if not chr(c).strip()]
    assert page_trims == server_trims


def test_browser_does_not_send_a_text_of_information_separators(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)
    say(page, "\x1c\x1d")  # white space to Python's str.strip(), not to JavaScript's trim()
    say(page, "real")
    expect(texts(page)).to_have_text(["real"])
    assert sent_texts(page) == ["real"]
    expect(page.locator("#chat-error")).not_to_contain_text("text is empty")


# The class, not only the instances: any headers a client may send, on both servers.

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
    st.sampled_from(chat.READABLE)
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


# A soak: clients that chat, drop and resume at random while HTTP posts run.

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
SOAK_CLIENTS = 100


def test_soak_clients_that_drop_and_resume_miss_nothing_and_leave_nothing_behind():
    fds_before = open_fds()
    with running_servers(history=100_000) as servers:
        soak_and_check(servers)
    assert open_fds() <= fds_before


def soak_and_check(servers):
    """SOAK_CLIENTS clients chat, drop and resume for SOAK_SECONDS while HTTP posts run; then
    each must have been shown every message once, in order."""
    rng = random.Random(7)
    seen = {n: [] for n in range(SOAK_CLIENTS)}  # every message id each client was shown, in order
    resumes = [0]

    async def client(n, deadline):
        while asyncio.get_running_loop().time() < deadline:
            since = seen[n][-1] if seen[n] else 0
            query = {"name": f"soak{n}", "since": since}
            # 100 people: each an address of its own
            async with connect_from(
                servers, f"127.0.2.{n + 1}", query=query, open_timeout=10
            ) as ws:
                resumes[0] += 1
                stay = rng.uniform(0.2, 3)
                chat_until = asyncio.get_running_loop().time() + stay
                next_send = 0.0
                while (now := asyncio.get_running_loop().time()) < min(chat_until, deadline):
                    if now >= next_send:
                        await ws.send(f"from soak{n}")
                        next_send = now + rng.uniform(1, 6)
                    try:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 0.2))
                    except TimeoutError:
                        continue
                    record(n, frame)
                if rng.random() < 0.5:
                    ws.transport.abort()  # half of the drops are abrupt, like a lost network
            await asyncio.sleep(rng.uniform(0, 0.3))

    def record(n, frame):
        batch = (
            frame["messages"]
            if frame["type"] == "history"
            else [frame]
            if frame["type"] == "message"
            else []
        )
        seen[n].extend(m["id"] for m in batch)

    async def catch_up(n, last_id):
        since = seen[n][-1] if seen[n] else 0
        query = {"since": since}
        async with connect_from(servers, f"127.0.2.{n + 1}", query=query, open_timeout=10) as ws:
            while not seen[n] or seen[n][-1] < last_id:
                record(n, json.loads(await asyncio.wait_for(ws.recv(), 10)))

    def http_poster(stop):
        n = 0
        while not stop.wait(0.1):
            n += 1
            assert (
                post(
                    servers.port,
                    "/messages",
                    {"name": "http", "text": f"post {n}"},
                    source="127.0.3.1",
                )[0]
                == 201
            )

    async def run():
        deadline = asyncio.get_running_loop().time() + SOAK_SECONDS
        await asyncio.gather(*(client(n, deadline) for n in range(SOAK_CLIENTS)))
        stop.set()
        await asyncio.to_thread(poster.join, 10)
        last_id = get(servers.port, "/health")[1]["last_id"]  # nobody posts any more
        await asyncio.gather(*(catch_up(n, last_id) for n in range(SOAK_CLIENTS)))
        return last_id

    stop = threading.Event()
    poster = threading.Thread(target=http_poster, args=(stop,))
    poster.start()
    try:
        last_id = run_async(run())
    finally:
        stop.set()
        poster.join(10)
    assert resumes[0] > SOAK_CLIENTS * 2 and last_id > SOAK_SECONDS * 10
    for n in range(SOAK_CLIENTS):
        assert seen[n] == list(range(1, last_id + 1)), f"client {n} missed or doubled a message"
    wait_for_health(servers.port, timeout=5, clients=0)


def test_sigterm_under_load_stops_within_5_seconds_with_1001_and_exit_0(chat_process):
    process = chat_process("--port", "0", "--ws-port", "0")
    process.urls()
    codes = []

    async def client(n, started):
        async with async_connect(
            f"ws://127.0.0.1:{process.ws_port}/?name=load{n}", max_queue=None
        ) as ws:
            started.append(n)
            try:
                while True:
                    await ws.send(f"load {n}")  # 8 a second: under the rate limit
                    with contextlib.suppress(TimeoutError):
                        while True:
                            await asyncio.wait_for(ws.recv(), 0.125)
            except websockets.exceptions.ConnectionClosed as closed:
                codes.append(closed.rcvd.code if closed.rcvd else None)

    async def run():
        started = []
        # will not answer the close
        silent = await asyncio.to_thread(silent_client, process.ws_port)
        tasks = [asyncio.create_task(client(n, started)) for n in range(20)]
        while len(started) < 20:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)  # messages are flowing
        begun = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        exit_code = await asyncio.to_thread(process.process.wait, 10)
        silent.close()
        return exit_code, time.monotonic() - begun

    exit_code, took = run_async(run())
    assert exit_code == 0 and took < 5
    assert codes == [1001] * 20


@pytest.mark.timeout(180)
def test_benchmark_quick_run_completes_and_loses_nothing(tmp_path):
    """Keeps bench_chat.py working; no speed is asserted (the machines are shared and noisy)."""
    bench = subprocess.run(
        [
            sys.executable,
            str(CHAT_PY.with_name("bench_chat.py")),
            "--quick",
            "--json",
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "| fan-out throughput, 100 receivers" in bench.stdout
    assert "Lost, duplicated or reordered deliveries in all runs: 0" in bench.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {row["scenario"] for row in rows} == {
        "throughput",
        "efficiency",
        "latency",
        "http",
        "memory",
        "resume",
    }


# --- Scaling out: two chat.py processes, one room in Redis ------------------------------


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free port, keeping its data across restarts (append-only file)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the Redis tests must run under CI: apt-get install redis-server")
        pytest.skip("no redis-server: apt-get install redis-server")
    server = RedisServer(binary, free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


def listens(port):
    """Something accepts connections on 127.0.0.1:`port`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class RedisServer:
    def __init__(self, binary, port, directory):
        self.binary, self.port, self.directory = binary, port, directory
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self):
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: listens(self.port), timeout=5, what="redis-server listening")

    def stop(self):
        self.process.terminate()  # SIGTERM: Redis writes its data and exits
        self.process.wait(10)


@pytest.fixture
def two_processes(redis_server, chat_process):
    processes = [
        chat_process("--port", "0", "--ws-port", "0", "--redis", redis_server.url) for _ in range(2)
    ]
    for process in processes:
        process.urls()
    return processes


def test_redis_senders_on_both_processes_give_every_client_the_same_order(two_processes):
    a, b = two_processes
    ws_senders = [f"ws://127.0.0.1:{p.ws_port}/" for p in (a, b)]
    listeners = [f"ws://127.0.0.1:{p.ws_port}/" for p in (a, b)]
    http_senders = [(a.port, "127.0.4.1"), (b.port, "127.0.4.2")]
    results = chat_from_everywhere(ws_senders, listeners, http_senders)
    stored_a = get(a.port, "/messages")[1]["messages"]
    assert stored_a == get(b.port, "/messages")[1]["messages"]
    assert_everyone_got(results, stored_a)


def test_redis_a_client_can_resume_on_the_other_process_and_miss_nothing(two_processes):
    a, b = two_processes
    with connect(f"ws://127.0.0.1:{a.ws_port}/", open_timeout=5, max_queue=None) as ws:
        room_id = receive(ws, "history")["room"]
        for n in range(3):
            post(a.port, "/messages", {"text": f"before {n}"})
        last_seen = [receive(ws, "message")["id"] for _ in range(3)][-1]
    for n in range(3):
        post(b.port, "/messages", {"text": f"while away {n}"})
    wait_for_health(b.port, last_id=6)  # b stores in Redis, then delivers what Redis publishes
    url = f"ws://127.0.0.1:{b.ws_port}/?since={last_seen}&room={room_id}"
    with connect(url, open_timeout=5, max_queue=None) as ws:
        history = receive(ws, "history")
        assert history["room"] == room_id
        assert [m["text"] for m in history["messages"]] == [f"while away {n}" for n in range(3)]


def test_redis_going_away_gives_errors_and_degraded_health_then_recovers(
    redis_server, two_processes
):
    a, b = two_processes
    post(a.port, "/messages", {"text": "before"})
    for process in two_processes:  # each has it once Redis published it: it is history, not live
        wait_for_health(process.port, last_id=1)
    with (
        connect(f"ws://127.0.0.1:{a.ws_port}/", open_timeout=5, max_queue=None) as on_a,
        connect(f"ws://127.0.0.1:{b.ws_port}/", open_timeout=5, max_queue=None) as on_b,
    ):
        receive(on_a, "history"), receive(on_b, "history")
        redis_server.stop()
        on_a.send("while redis is away")
        assert "cannot store" in receive(on_a, "error")["error"]
        status, body = post(b.port, "/messages", {"text": "also while away"})
        assert status == 503 and "room" in body["errors"]
        wait_for_health(a.port, status="degraded")
        assert request(a.port, "GET", "/health")[0] == 503

        redis_server.start()
        wait_for_health(a.port, status="ok")
        wait_for_health(b.port, status="ok")
        assert post(b.port, "/messages", {"text": "back"})[0] == 201
        for ws in (on_a, on_b):
            message = receive(ws, "message")
            assert (message["id"], message["text"]) == (2, "back")
    assert stored_texts(a.port) == ["before", "back"]


def test_redis_restarted_without_its_data_ids_go_on_and_nothing_is_doubled(
    redis_server, two_processes
):
    a, b = two_processes
    for n in range(3):
        post(a.port, "/messages", {"text": f"before {n}"})
    wait_for_health(b.port, last_id=3)  # b has them once Redis published them to it
    with connect(f"ws://127.0.0.1:{b.ws_port}/", open_timeout=5, max_queue=None) as on_b:
        assert len(receive(on_b, "history")["messages"]) == 3
        redis_server.stop()
        shutil.rmtree(redis_server.directory)  # a Redis that keeps nothing, or a new one
        redis_server.directory.mkdir()
        redis_server.start()
        # the first command after a restart finds its connection cut
        wait_for_health(a.port, status="ok")
        status, message = post(a.port, "/messages", {"text": "after"})
        assert status == 201 and message["id"] == 4
        assert (receive(on_b, "message")["id"]) == 4
    assert [m["id"] for m in get(b.port, "/messages")[1]["messages"]] == [1, 2, 3, 4]


def test_redis_unreachable_at_start_is_one_line_and_exit_2(chat_process):
    process = chat_process(
        "--port", "0", "--ws-port", "0", "--redis", f"redis://127.0.0.1:{free_port()}/0"
    )
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and "cannot reach Redis" in error


def test_the_default_chat_does_not_import_redis():
    code = "import sys, chat; s = chat.Servers(port=0, ws_port=0); s.stop(); print('redis' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=CHAT_PY.parent,
        check=False,
    )
    assert result.stdout.strip() == "False", result.stderr


# --- Under load and hostile clients: big resumes, many connections, slow HTTP -----------


def seed_big(count):
    """`count` messages of 2000 emoji (8 KB each), straight into the room."""

    async def post_all():
        for _ in range(count):
            await chat.room.post("big", "😀" * 2000)

    chat.ask_room(post_all())


def server_waits_for_a_client(servers):
    """True when the server holds back writes to some client because it does not read."""

    async def any_paused():
        return any(connection.paused for connection in servers.ws_server.all_connections)

    return asyncio.run_coroutine_threadsafe(any_paused(), servers.loop).result(5)


def server_connections(servers):
    async def count():
        return len(servers.ws_server.all_connections)

    return asyncio.run_coroutine_threadsafe(count(), servers.loop).result(5)


@pytest.fixture
def big_room():
    """A room keeping 2000 messages of 8 KB, 16 MB: more than the kernel's socket buffers
    (4 MB here) and the 1 MiB write limit together."""
    with running_servers(history=2000) as servers:
        seed_big(2000)
        yield servers


@contextlib.contextmanager
def stalled_resume(servers):
    """A client resuming with since=0 that does not read until the server waits for it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", servers.ws_port))
    with connect(
        ws_url(servers, since=0), sock=sock, open_timeout=5, close_timeout=1, max_queue=1
    ) as ws:
        wait_until(
            lambda: server_waits_for_a_client(servers), what="the server waiting for the reader"
        )
        yield ws


def test_a_history_bigger_than_the_write_limit_comes_in_bounded_pieces(server):
    seed_big(600)  # 4.8 MB: once a single frame, past the 1 MiB limit, and the client was dropped
    with connect(ws_url(server, since=0), open_timeout=5, max_queue=None) as ws:
        pieces = []
        while not pieces or pieces[-1]["more"]:
            frame = ws.recv(timeout=10)
            assert len(frame.encode()) < chat.MAX_QUEUED
            pieces.append(json.loads(frame))
    assert all(piece["type"] == "history" for piece in pieces)
    assert [piece["more"] for piece in pieces] == [True] * (len(pieces) - 1) + [False]
    assert [m["id"] for piece in pieces for m in piece["messages"]] == list(range(1, 601))


def test_a_resuming_client_that_reads_slowly_is_waited_for_not_dropped(big_room):
    with stalled_resume(big_room) as ws:
        history = receive_history(ws)
        assert [m["id"] for m in history["messages"]] == list(range(1, 2001))
        ws.send("still connected")
        assert receive(ws, "message")["id"] == 2001


def test_messages_posted_while_a_client_catches_up_reach_it_once_in_order(big_room):
    with stalled_resume(big_room) as ws:
        for n in range(5):
            post(big_room.port, "/messages", {"text": f"meanwhile {n}"})
        ids = [m["id"] for m in receive_history(ws)["messages"]]
        post(big_room.port, "/messages", {"text": "after"})
        ids.append(receive(ws, "message")["id"])
    assert ids == list(range(1, 2007))


def test_a_resuming_client_that_stops_reading_is_dropped_after_the_ping_timeout(monkeypatch):
    monkeypatch.setattr(chat, "PING_TIMEOUT", 0.5)  # 20 s in real life
    with running_servers(history=2000) as servers:
        seed_big(2000)
        with stalled_resume(servers):
            wait_until(
                lambda: not server_connections(servers),
                timeout=5,
                what="the stalled client dropped",
            )
        wait_for_health(servers.port, clients=0)  # it never joined the room


def test_get_messages_since_finds_its_start_in_a_trimmed_history(small_server):
    for n in range(1, 6):
        post(small_server.port, "/messages", {"text": f"m{n}"})
    ids = lambda since: [
        m["id"] for m in get(small_server.port, f"/messages?since={since}")[1]["messages"]
    ]
    assert (ids(0), ids(1), ids(3), ids(4), ids(5), ids(99)) == (
        [3, 4, 5],
        [3, 4, 5],
        [4, 5],
        [5],
        [],
        [],
    )


def test_a_full_room_refuses_the_handshake_with_503_and_http_still_answers(monkeypatch):
    monkeypatch.setattr(chat, "MAX_CLIENTS", 3)
    with running_servers() as servers, contextlib.ExitStack() as stack:
        first = stack.enter_context(joined(servers))[0]
        for _ in range(2):
            stack.enter_context(joined(servers))
        with (
            pytest.raises(websockets.exceptions.InvalidStatus) as refused,
            connect(ws_url(servers), open_timeout=5),
        ):
            pass
        assert refused.value.response.status_code == 503
        assert b"full" in refused.value.response.body
        assert request(servers.port, "GET", "/")[0] == 200
        assert get(servers.port, "/health")[0] == 200
        first.close()
        wait_for_health(servers.port, clients=2)
        with joined(servers) as (_, history):  # a place is free again
            assert history["type"] == "history"


def fd_limit(soft, hard):
    """For preexec_fn: `python chat.py` starts with these descriptor limits."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_descriptor_limit_is_raised_to_the_hard_limit_at_start(chat_process):
    process = chat_process("--port", "0", "--ws-port", "0", preexec_fn=fd_limit(100, 300))
    process.urls()
    limits = Path(f"/proc/{process.process.pid}/limits").read_text()
    soft, hard = next(
        line for line in limits.splitlines() if line.startswith("Max open files")
    ).split()[3:5]
    assert (soft, hard) == ("300", "300")


def test_connections_that_never_handshake_cannot_take_the_descriptors_http_needs(chat_process):
    process = chat_process("--port", "0", "--ws-port", "0", preexec_fn=fd_limit(128, 128))
    process.urls()
    raw = []
    try:
        for _ in range(150):  # more than the 128 descriptors chat.py has
            raw.append(socket.create_connection(("127.0.0.1", process.ws_port), timeout=5))
        # Before open_timeout (5 s) could free any: those past the cap are closed at once.
        wait_until(
            lambda: sum(map(closed_by_server, raw)) >= 100, timeout=3, what="100 closed at once"
        )
        connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=3)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        for sock in raw:
            sock.close()


def closed_by_server(sock):
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False  # open, nothing to read
    except ConnectionResetError:
        return True


def test_a_handshake_that_never_completes_is_closed_quickly(monkeypatch):
    monkeypatch.setattr(chat, "OPEN_TIMEOUT", 0.5)  # 5 s in real life; websockets' default is 10
    with (
        running_servers() as servers,
        socket.create_connection(("127.0.0.1", servers.ws_port), timeout=3) as sock,
    ):
        sock.sendall(b"GET / HTTP/1.1\r\n")  # and nothing more
        assert sock.recv(1024) == b""  # closed by the server; a timeout fails the test


def test_a_few_hundred_idle_or_trickling_http_connections_do_not_lock_others_out(server):
    idle = []
    try:
        for n in range(300):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if n % 3 == 0:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a request that trickles in
            idle.append(sock)
        assert request(server.port, "GET", "/")[0] == 200
        assert post(server.port, "/messages", {"text": "still posting"})[0] == 201
    finally:
        for sock in idle:
            sock.close()


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


def test_a_post_the_busy_loop_cannot_answer_in_time_is_a_503_and_never_stored(server, monkeypatch):
    monkeypatch.setattr(chat, "HTTP_WAIT", 0.2)  # 5 s in real life; the mechanism is the same
    server.loop.call_soon_threadsafe(time.sleep, 1)  # the loop is busy for a second
    status, _, body = request(server.port, "POST", "/messages", {"text": "too late"})
    assert status == 503 and "too busy" in json.loads(body)["errors"]["room"]
    monkeypatch.setattr(chat, "HTTP_WAIT", 5)
    wait_for_health(server.port, messages=0)  # the loop is back, and did not store it after all
    assert stored_texts(server.port) == []


def test_the_same_error_again_and_again_is_logged_once_per_interval(caplog):
    chat.log_repeated_errors_once()
    token = os.urandom(4).hex()  # a message no earlier test logged
    for _ in range(100):
        logging.getLogger("waitress").warning(f"server accept() threw an exception {token}")
    logging.getLogger("asyncio").error(f"socket.accept() out of system resource {token}")
    assert [r.getMessage() for r in caplog.records if token in r.getMessage()] == [
        f"server accept() threw an exception {token}",
        f"socket.accept() out of system resource {token}",
    ]


# --- The page's promises, server side: a message's ref, the heartbeat ---------------------


def test_a_repeated_ref_gets_the_stored_message_back_and_stores_nothing(server):
    with joined(server) as (ws, _), joined(server) as (other, _):
        ws.send(json.dumps({"type": "message", "text": "once", "ref": "r1"}))
        first = receive(ws, "message")
        assert first["ref"] == "r1" and receive(other, "message") == first
        ws.send(json.dumps({"type": "message", "text": "once", "ref": "r1"}))
        assert receive(ws, "message") == first  # the same message again, to the sender only
        ws.send(json.dumps({"type": "message", "text": "next", "ref": "r2"}))
        assert receive(other, "message")["text"] == "next"  # not "once" a second time
    assert stored_texts(server.port) == ["once", "next"]


@pytest.mark.parametrize("path", ["/messages", "/send_message"])
def test_a_repeated_ref_over_http_answers_200_with_the_stored_message(server, path):
    status, first = post(server.port, path, {"text": "hello", "ref": "abc"})
    assert status == 201 and first["ref"] == "abc"
    assert post(server.port, path, {"text": "hello", "ref": "abc"}) == (200, first)
    assert len(get(server.port, "/messages")[1]["messages"]) == 1


@pytest.mark.parametrize("ref", ["", "x" * 65, 7, ["a"]])
def test_a_bad_ref_is_refused_naming_the_rule(server, ref):
    status, body = post(server.port, "/messages", {"text": "hi", "ref": ref})
    assert status == 400 and "ref must be a string of 1 to 64 characters" in body["errors"]["ref"]
    with joined(server) as (ws, _):
        ws.send(json.dumps({"type": "message", "text": "hi", "ref": ref}))
        assert receive(ws, "error")["error"] == "ref must be a string of 1 to 64 characters"
    assert get(server.port, "/messages")[1]["messages"] == []


def test_an_error_frame_carries_the_ref_of_the_message_it_refuses(server):
    with joined(server) as (ws, _):
        ws.send(json.dumps({"type": "message", "text": "x" * 2001, "ref": "too-long"}))
        assert receive(ws, "error")["ref"] == "too-long"


def test_a_ref_is_forgotten_with_its_message(small_server):
    post(small_server.port, "/messages", {"text": "old", "ref": "r"})
    for n in range(3):  # the room keeps 3: "old" and its ref are gone
        post(small_server.port, "/messages", {"text": f"new {n}"})
    assert post(small_server.port, "/messages", {"text": "again", "ref": "r"})[0] == 201
    assert len(chat.room.refs) == 1


def frames_but_presence(ws, count):
    frames = []
    while len(frames) < count:
        frame = json.loads(ws.recv(timeout=5))
        if frame["type"] != "presence":
            frames.append(frame)
    return frames


def test_ping_gets_a_pong_and_is_not_counted_as_a_message(server):
    with joined(server) as (ws, _):
        for _ in range(60):  # three times the burst of messages
            ws.send(json.dumps({"type": "ping"}))
        answers = [frame["type"] for frame in frames_but_presence(ws, 60)]
        assert answers == ["pong"] * 60
        ws.send("still allowed")
        assert receive(ws, "message")["text"] == "still allowed"


def test_redis_a_ref_sent_again_to_the_other_process_is_stored_once(two_processes):
    a, b = two_processes
    status, first = post(a.port, "/messages", {"text": "once", "ref": "shared"})
    assert status == 201
    assert post(b.port, "/messages", {"text": "once", "ref": "shared"}) == (200, first)
    with connect(f"ws://127.0.0.1:{b.ws_port}/", open_timeout=5, max_queue=None) as ws:
        receive(ws, "history")
        ws.send(json.dumps({"type": "message", "text": "once", "ref": "shared"}))
        assert receive(ws, "message") == first
    assert stored_texts(a.port) == ["once"]


# --- Promises of the README that no test checked -------------------------------------

STEADY = 40  # messages sent after the burst at twice the sustained rate: 2 seconds of it


def send_at(rate, count, send):
    """send(n) for n = 0, 1, ... count - 1 at `rate` a second on a fixed schedule (a late
    start catches up); returns the time just before the last send."""
    began = time.monotonic()
    for n in range(count):
        threading.Event().wait(max(0.0, began + n / rate - time.monotonic()))
        last = time.monotonic()
        send(n)
    return last


def assert_held_to_the_rate(accepted, began, steady_began, steady_last_sent, ended):
    """After a spent burst, a sender twice as fast as PER_SECOND gets PER_SECOND a second.

    Bounds from the rule and the times measured: no more than the refill since `began` (the
    burst took the rest); no fewer than the refill while the steady sender was sending, less
    3 for the fractions of a token at either end and one send interval.
    """
    assert accepted <= most_allowed(ended - began) - BURST
    assert accepted >= PER_SECOND * (steady_last_sent - steady_began) - 3


def test_after_the_burst_a_websocket_may_send_10_a_second(server):
    with joined(server) as (ws, _):
        began = time.monotonic()
        for n in range(BURST):
            ws.send(f"burst {n}")
        burst = receive_until(ws, lambda frames: len(frames) == BURST, ("message", "error"))
        steady_began = time.monotonic()
        last_sent = send_at(2 * PER_SECOND, STEADY, lambda n: ws.send(f"steady {n}"))
        steady = receive_until(ws, lambda frames: len(frames) == STEADY, ("message", "error"))
        ended = time.monotonic()
    assert [frame["type"] for frame in burst] == ["message"] * BURST
    accepted = sum(frame["type"] == "message" for frame in steady)
    assert_held_to_the_rate(accepted, began, steady_began, last_sent, ended)
    assert all("too fast" in frame["error"] for frame in steady if frame["type"] == "error")


def test_after_the_burst_an_address_may_post_10_a_second(server):
    def post_one(text):
        return post(server.port, "/messages", {"text": text}, source="127.0.0.8")[0]

    began = time.monotonic()
    assert [post_one(f"burst {n}") for n in range(BURST)] == [201] * BURST
    steady_began, statuses = time.monotonic(), []
    last_sent = send_at(2 * PER_SECOND, STEADY, lambda n: statuses.append(post_one(f"steady {n}")))
    ended = time.monotonic()
    assert set(statuses) <= {201, 429}
    assert_held_to_the_rate(statuses.count(201), began, steady_began, last_sent, ended)


def test_get_messages_gives_at_most_100_by_default(server):
    seed(150)
    _, body = get(server.port, "/messages")
    assert [m["id"] for m in body["messages"]] == list(range(1, 101))


def test_send_message_with_neither_text_nor_message_is_a_400_naming_text(server):
    status, body = post(
        server.port, "/send_message", "name=bob", "application/x-www-form-urlencoded"
    )
    assert status == 400 and "text" in body["errors"]
    assert get(server.port, "/messages")[1]["messages"] == []


def test_config_tells_the_page_the_text_and_name_limits(server):
    _, config = get(server.port, "/config")
    assert (config["max_text"], config["max_name"]) == (2000, 32)


def test_health_last_id_counts_on_past_what_the_history_keeps(small_server):
    for n in range(5):
        post(small_server.port, "/messages", {"text": f"m{n}"})
    _, health = get(small_server.port, "/health")
    assert (health["messages"], health["last_id"]) == (3, 5)


def test_two_people_may_share_a_name_and_each_is_counted(server):
    with joined(server, name="watcher") as (watcher, _):
        receive(watcher, "presence")  # its own join
        with joined(server, name="sam") as (first, _), joined(server, name="sam") as (second, _):
            assert all_changes(presence_frames(watcher, 2)) == [{"joined": "sam"}] * 2
            assert get(server.port, "/health")[1]["clients"] == 3
            first.close()
            assert receive(watcher, "presence")["changes"] == [{"left": "sam"}]
            second.send("still here")
            assert receive(watcher, "message")["name"] == "sam"


def test_a_presence_frame_for_several_changes_carries_them_only_in_changes(server):
    with contextlib.ExitStack() as stack:
        watcher, _ = stack.enter_context(joined(server, name="watcher"))
        renamers = [stack.enter_context(joined(server, name=f"a{n}"))[0] for n in range(3)]
        presence_frames(watcher, 4)  # the joins
        for n, renamer in enumerate(renamers):  # at once: the 2nd and 3rd wait for the next window
            renamer.send(json.dumps({"type": "name", "name": f"b{n}"}))
        frames = presence_frames(watcher, 3)
    assert sorted(change["renamed"]["to"] for change in all_changes(frames)) == ["b0", "b1", "b2"]
    for frame in frames:
        if len(frame["changes"]) == 1:
            assert frame["renamed"] == frame["changes"][0]["renamed"]  # one change: also at the top
        else:
            assert not {"joined", "left", "renamed"} & frame.keys()
    assert any(len(frame["changes"]) > 1 for frame in frames)


def test_websocket_text_and_name_are_trimmed(server):
    with joined(server, name="  padded  ") as (ws, history):
        assert history["name"] == "padded"
        ws.send(json.dumps({"type": "name", "name": " \tbob  "}))
        ws.send(json.dumps({"type": "message", "text": "\n  hi there  \n"}))
        message = receive(ws, "message")
    assert (message["name"], message["text"]) == ("bob", "hi there")


@pytest.mark.parametrize(
    "frame, error",
    [
        ({"type": "message", "text": "\ud800"}, "text is not valid Unicode"),
        ({"type": "name", "name": "\ud800"}, "name is not valid Unicode"),
        ({"type": "name", "name": "a\nb"}, "name has control characters"),
        ({"type": "name", "name": "bell\x07"}, "name has control characters"),
        ({"type": "name", "name": " \t "}, "name is empty"),
    ],
)
def test_websocket_frames_follow_the_text_and_name_rules_of_http(server, frame, error):
    with joined(server, name="kept") as (ws, _):
        ws.send(json.dumps(frame))  # ASCII JSON: a lone surrogate travels as the escape \ud800
        assert error in receive(ws, "error")["error"]
        ws.send("still here")
        assert receive(ws, "message")["name"] == "kept"
    assert stored_texts(server.port) == ["still here"]


def test_a_name_with_control_characters_in_the_url_gets_an_error_and_a_guest_name(server):
    with joined(server, name="a\nb") as (ws, history):
        assert history["name"].startswith("guest-")
        assert "control characters" in receive(ws, "error")["error"]


# --- The page in a real browser (Playwright driving Debian's Chromium) -----------------
# Playwright's sync API keeps an event loop running in the main thread for the whole session:
# asyncio code in tests goes through run_async(), so these tests may run in any order.


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "Playwright is not installed: python -m pip install -r requirements-test.txt"
    else:
        missing = (
            None
            if os.path.exists(CHROMIUM)
            else f"no Chromium at {CHROMIUM}: apt-get install chromium"
        )
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests must run under CI: {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser):
    """Opens the chat as a new person (own storage); fails the test on any dialog or CSP error."""
    from playwright.sync_api import expect

    contexts, problems = [], []

    def open_as(
        port=None, name=None, clock=False, prepare=None, online=True, url=None, **context_options
    ):
        """The page at http://127.0.0.1:`port`/, or at `url`. `name`: a returning visitor's kept
        name (the page joins at once); without it, a first-time visitor who takes the suggested
        name. `clock`: Playwright's clock, to move the page's timers on; `prepare(context)`:
        routes to set up before the page loads; `context_options`: a viewport, say."""
        context = browser.new_context(**context_options)
        contexts.append(context)
        if clock:
            context.clock.install()
        if prepare:
            prepare(context)
        if name:
            context.add_init_script(f"localStorage.setItem('chat-name', {json.dumps(name)})")
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.sent_frames = []  # every frame the page sends on its websockets, as sent
        page.on(
            "websocket", lambda ws: ws.on("framesent", lambda frame: page.sent_frames.append(frame))
        )
        page.on(
            "dialog",
            lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()),
        )
        page.on(
            "console",
            lambda msg: "Content Security Policy" in msg.text and problems.append(msg.text),
        )
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.touch = context_options.get("has_touch", False)
        page.goto(url or f"http://127.0.0.1:{port}/")
        if online:
            if not name:
                page.press("#name-input", "Enter")  # a first-time visitor takes the suggestion
            expect(page.locator("#status")).to_have_text("online")
        return page

    yield open_as
    for context in contexts:
        context.close()
    assert problems == []


def say(page, text):
    """Types `text` and sends it: Enter, or on a touch screen the Send button."""
    page.fill("#message-input", text)
    if getattr(page, "touch", False):
        page.get_by_role("button", name="Send").click()
    else:
        page.press("#message-input", "Enter")


def texts(page):
    return page.locator("#chat-box .message .text")


def test_browser_message_typed_in_one_page_shows_in_both_in_order_with_names(server, open_page):
    from playwright.sync_api import expect

    alice, bob = open_page(server.port, "alice"), open_page(server.port, "bob")
    for text in ["one", "two", "three"]:
        say(alice, text)
    expect(texts(bob)).to_have_text(["one", "two", "three"])
    say(bob, "four")
    for page in (alice, bob):
        expect(texts(page)).to_have_text(["one", "two", "three", "four"])
        expect(page.locator("#chat-box .message strong")).to_have_text(["alice"] * 3 + ["bob"])
    expect(alice.locator("#chat-box .message.own .text")).to_have_text(["one", "two", "three"])
    expect(bob.locator("#chat-box .message.own .text")).to_have_text(["four"])


def test_browser_shows_history_on_load_and_who_is_online(server, open_page):
    from playwright.sync_api import expect

    for text in ["earlier 1", "earlier 2"]:
        post(server.port, "/messages", {"name": "carol", "text": text})
    alice = open_page(server.port, "alice")
    expect(texts(alice)).to_have_text(["earlier 1", "earlier 2"])
    open_page(server.port, "bob")
    expect(alice.locator("#online li")).to_have_text(["alice (you)", "bob"])
    expect(alice.locator("#chat-box .notice").last).to_have_text("bob joined")


def wait_in_page(page, condition, timeout=10):
    """Lets the page run until `condition()` holds (Playwright delivers events meanwhile)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the page"
        page.wait_for_timeout(50)


def sent_texts(page):
    """The texts of the message frames the page has sent."""
    frames = [json.loads(frame) for frame in page.sent_frames]
    return [
        frame.get("text")
        for frame in frames
        if isinstance(frame, dict) and frame.get("type") == "message"
    ]


def test_browser_does_not_send_an_empty_message(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)
    say(page, "   ")
    say(page, "real")
    expect(texts(page)).to_have_text(["real"])
    wait_in_page(page, lambda: "real" in sent_texts(page))
    assert sent_texts(page) == ["real"]
    # no refusal from the server
    expect(page.locator("#chat-error")).not_to_contain_text("text is empty")


def test_browser_shows_server_errors_next_to_the_input(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)
    page.fill("#name-input", "bell\u0007")  # a name the server refuses
    page.dispatch_event("#name-input", "change")
    expect(page.locator("#chat-error")).to_contain_text("control characters")


def test_browser_reconnects_after_a_drop_and_shows_what_it_missed_once(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    page.evaluate("""() => {
        window.statuses = [];
        new MutationObserver(() => statuses.push(document.getElementById("status").textContent))
            .observe(document.getElementById("status"), {childList: true, characterData: true, subtree: true});
    }""")
    for text in ["before 1", "before 2"]:
        post(server.port, "/messages", {"name": "bob", "text": text})
    expect(texts(page)).to_have_text(["before 1", "before 2"])

    async def drop_everyone_then_post():
        for connection in list(chat.room.clients):
            connection.transport.abort()
        for text in ["missed 1", "missed 2"]:
            await chat.room.post("bob", text)

    chat.ask_room(drop_everyone_then_post())
    expect(texts(page)).to_have_text(["before 1", "before 2", "missed 1", "missed 2"])
    post(server.port, "/messages", {"name": "bob", "text": "after"})
    expect(texts(page)).to_have_text(["before 1", "before 2", "missed 1", "missed 2", "after"])
    assert "reconnecting…" in page.evaluate("statuses")
    expect(page.locator("#status")).to_have_text("online")


def test_browser_recovers_when_the_server_restarts_on_the_same_ports(chat_process, open_page):
    from playwright.sync_api import expect

    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    first = chat_process(*ports)
    first.urls()
    page = open_page(first.port, "alice")
    for text in ["old 1", "old 2", "old 3"]:
        post(first.port, "/messages", {"text": text})
    expect(texts(page)).to_have_text(["old 1", "old 2", "old 3"])
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(5) == 0

    second = chat_process(*ports)
    second.urls()
    # id 1 again: only the room id tells them apart
    post(second.port, "/messages", {"text": "new 1"})
    expect(texts(page)).to_have_text(["old 1", "old 2", "old 3", "new 1"])
    expect(page.locator("#chat-box .notice", has_text="restarted")).to_have_count(1)
    post(second.port, "/messages", {"text": "new 2"})
    expect(texts(page)).to_have_text(["old 1", "old 2", "old 3", "new 1", "new 2"])


def test_browser_after_a_restart_loads_older_messages_of_the_new_room_only(chat_process, open_page):
    from playwright.sync_api import expect

    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    first = chat_process(*ports)
    first.urls()
    for n in range(60):  # more than the 50 a page gets on load: older ones can be loaded
        post(first.port, "/messages", {"text": f"old {n + 1}"}, source=f"127.0.0.{2 + n // 20}")
    page = open_page(first.port, "alice")
    older = page.get_by_role("button", name="Load older messages")
    expect(older).to_be_visible()  # ids 11 to 60 are shown; 1 to 10 can be loaded
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(5) == 0

    second = chat_process(*ports)
    second.urls()
    post(second.port, "/messages", {"text": "new 1"})
    expect(texts(page).last).to_have_text("new 1")
    expect(older).to_be_hidden()  # the new room's first message, id 1, is shown: nothing older


def test_screenshot_script_still_makes_a_picture(browser, tmp_path):
    sys.path.insert(0, str(Path(__file__).with_name("docs")))
    from screenshot import make_screenshot, make_workshop_screenshots

    make_screenshot(browser, tmp_path / "shot.png")
    make_workshop_screenshots(browser, tmp_path)
    for shot in ("shot.png", "screenshot-workshop.png", "screenshot-workshop-phone.png"):
        assert (tmp_path / shot).read_bytes().startswith(b"\x89PNG")


# --- Who may talk to the chat: the Host allow-list and no cross-site writes -------------
# (Policy in chat.py.) A rebinding page sends the attacker's name in Host; a cross-site
# page sends its own origin in Origin. Browser tests of both come after these.

REBIND = "rebind.example"  # a name an attacker could point at 127.0.0.1
ALL_ROUTES = [
    ("GET", "/"),
    ("GET", "/chat"),
    ("GET", "/config"),
    ("GET", "/messages"),
    ("GET", "/get_messages"),
    ("GET", "/health"),
    ("GET", "/nope"),
    ("POST", "/messages"),
    ("POST", "/send_message"),
]


def handshake(ws_port, host, path="/", origin=None):
    """A websocket handshake to this machine that names `host` in its Host header."""
    sock = socket.create_connection(("127.0.0.1", ws_port), timeout=5)
    return connect(
        f"ws://{host}:{ws_port}{path}", sock=sock, open_timeout=5, origin=origin, max_queue=None
    )


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


def test_host_0_0_0_0_prints_addresses_people_can_open_never_0_0_0_0(chat_process):
    process = chat_process("--host", "0.0.0.0", "--port", "0", "--ws-port", "0")
    page, websocket = process.urls()  # the first two lines, as tools read them
    lines = [page, websocket]
    while not lines[-1].startswith("Websocket:  ws://127.0.0.1:"):  # loopback comes last
        lines.append(process.lines.get(timeout=5))
    assert "0.0.0.0" not in "".join(lines)
    key = f"?key={process.key}"  # a room key: strangers can reach this chat
    assert lines[-2:] == [
        f"Chat page:  http://127.0.0.1:{process.port}/{key}\n",
        f"Websocket:  ws://127.0.0.1:{process.ws_port}/{key}\n",
    ]
    for page_line, ws_line in zip(lines[::2], lines[1::2], strict=True):
        address = page_line.split("//")[1].split(":")[0]
        assert page_line == f"Chat page:  http://{address}:{process.port}/{key}\n"
        assert ws_line == f"Websocket:  ws://{address}:{process.ws_port}/{key}\n"
        assert (
            request(process.port, "GET", "/health", headers={"Host": f"{address}:{process.port}"})[
                0
            ]
            == 200
        )


# The same in a real browser: another site's page, and the chat page opened at every address.


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


# --- Online: behind a proxy, several processes -------------------------------------------
# --public-url: the page's origin is the proxy's, the websocket is at /ws on it, and the
# proxy's X-Forwarded-For counts. Then the real thing: deploy/nginx.conf in front of two
# chat.py --redis, and two pages in Chromium over https and wss.

PUBLIC = "https://chat.example.org"
ROOM_KEY = "a-room-key-for-the-tests-0123"  # what --key takes: 16 or more of [A-Za-z0-9_-]


@pytest.fixture
def proxied_server():
    """The chat as a proxy on this machine would reach it: --public-url https://chat.example.org."""
    with running_servers(public_url=PUBLIC) as servers:
        yield servers


def test_public_url_config_sends_the_page_to_ws_on_its_own_origin(proxied_server):
    status, config = get(proxied_server.port, "/config")
    assert status == 200 and config["ws_path"] == "/ws"


def test_without_public_url_config_has_no_ws_path(server):
    assert get(server.port, "/config")[1]["ws_path"] is None


def test_public_url_page_policy_allows_the_wss_address(proxied_server):
    headers = {"Host": "chat.example.org"}
    status, _, _ = request(proxied_server.port, "GET", "/", headers=headers)
    connection = http.client.HTTPConnection("127.0.0.1", proxied_server.port, timeout=10)
    connection.request("GET", "/", headers=headers)
    policy = connection.getresponse().getheader("Content-Security-Policy")
    connection.close()
    assert status == 200
    assert "connect-src 'self' wss://chat.example.org/ws;" in policy


def test_public_url_origin_is_the_page_origin_for_posts_and_the_handshake(proxied_server):
    headers = {"Host": "chat.example.org", "Origin": PUBLIC}
    assert (
        request(
            proxied_server.port, "POST", "/messages", {"text": "via the proxy"}, headers=headers
        )[0]
        == 201
    )
    with handshake(proxied_server.ws_port, "chat.example.org", "/ws", origin=PUBLIC) as ws:
        assert [m["text"] for m in receive(ws, "history")["messages"]] == ["via the proxy"]
    direct = f"http://127.0.0.1:{proxied_server.port}"  # not the page's origin any more
    assert (
        request(
            proxied_server.port, "POST", "/messages", {"text": "x"}, headers={"Origin": direct}
        )[0]
        == 403
    )
    with (
        pytest.raises(websockets.exceptions.InvalidStatus) as refused,
        handshake(proxied_server.ws_port, "127.0.0.1", "/ws", origin=direct),
    ):
        pass
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize(
    "args",
    [
        ["--public-url", "https://chat.example.org/chat/"],
        ["--public-url", "chat.example.org"],
        ["--public-url", "https://x:port"],
        ["--allow-host", "chat.lan:8000"],
        ["--allow-host", "http://chat.lan"],
    ],
)
def test_a_bad_public_url_or_allow_host_is_one_line_and_exit_2(chat_process, args):
    process = chat_process(*args)
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and error.startswith(f"chat.py: error: argument {args[0]}")


def flood(port, forwarded_for, source="127.0.0.1", count=25):
    """`count` posts at once, each naming the next address of `forwarded_for` in X-Forwarded-For."""
    statuses = []
    for n in range(count):
        headers = {"X-Forwarded-For": forwarded_for[n % len(forwarded_for)]}
        statuses.append(
            request(port, "POST", "/messages", {"text": f"m{n}"}, headers=headers, source=source)[0]
        )
    return statuses


def test_behind_the_proxy_each_forwarded_client_has_its_own_rate_limit(proxied_server):
    assert 429 in flood(proxied_server.port, ["198.51.100.1"])  # one person past the limit
    assert flood(proxied_server.port, ["198.51.100.2"], count=1) == [201]  # another, same proxy


# a client that claims a new address per post
NEW_ADDRESS_EACH_TIME = [f"198.51.100.{n}" for n in range(1, 30)]


def test_x_forwarded_for_from_anyone_but_the_proxy_is_ignored(proxied_server):
    assert 429 in flood(proxied_server.port, NEW_ADDRESS_EACH_TIME, source="127.0.0.2")


def test_x_forwarded_for_is_ignored_when_no_proxy_is_declared(server):
    assert 429 in flood(server.port, NEW_ADDRESS_EACH_TIME)


def needed_program(name, install):
    """The path of a program the proxy test needs: skipped where missing, failed under CI."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the proxy test must run under CI: apt-get install {install}")
        pytest.skip(f"no {name}: apt-get install {install}")
    return found


class Nginx:
    """Debian's nginx, unprivileged, running deploy/nginx.conf with its ports, name and certificate replaced."""

    def __init__(self, binary, directory):
        self.binary, self.directory = binary, directory
        self.https_port = free_port_nobody_else_picks()
        self.url = f"https://localhost:{self.https_port}"

    def configure(self, chat_processes):
        (http_a, ws_a), (http_b, ws_b) = [
            (process.port, process.ws_port) for process in chat_processes
        ]
        d = self.directory
        site = CHAT_PY.with_name("deploy").joinpath("nginx.conf").read_text()
        replacements = {
            "listen 443 ssl;": f"listen 127.0.0.1:{self.https_port} ssl;",
            "listen 80;": f"listen unix:{d}/http.sock;",  # no second TCP port to find
            "chat.example.org": "localhost",
            "/etc/letsencrypt/live/localhost/fullchain.pem": f"{d}/cert.pem",
            "/etc/letsencrypt/live/localhost/privkey.pem": f"{d}/key.pem",
            "server 127.0.0.1:8000 ": f"server 127.0.0.1:{http_a} ",
            "server 127.0.0.1:8001 ": f"server 127.0.0.1:{http_b} ",
            "server 127.0.0.1:8765 ": f"server 127.0.0.1:{ws_a} ",
            "server 127.0.0.1:8766 ": f"server 127.0.0.1:{ws_b} ",
        }
        for old, new in replacements.items():
            assert old in site, f"deploy/nginx.conf no longer has {old!r}: update this test"
            site = site.replace(old, new)
        (d / "chat.conf").write_text(site)
        temp_paths = "".join(
            f"    {kind}_temp_path {d}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (d / "nginx.conf").write_text(
            f"error_log {d}/error.log;\nevents {{}}\nhttp {{\n    access_log off;\n{temp_paths}    include {d}/chat.conf;\n}}\n"
        )

    def start(self):
        d = self.directory
        self.process = subprocess.Popen(
            [
                self.binary,
                "-p",
                str(d),
                "-c",
                str(d / "nginx.conf"),
                "-e",
                str(d / "error.log"),
                "-g",
                f"daemon off; pid {d}/nginx.pid;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # ready when /health answers through it (another program may hold the port)
        wait_until(self.answers, timeout=10, what="nginx answering /health")

    def answers(self):
        if self.process.poll() is not None:
            with self.process.stderr:
                raise RuntimeError(f"nginx did not start: {self.process.stderr.read()}")
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.https_port, timeout=1, context=unverified_tls()
        )
        with contextlib.suppress(OSError), contextlib.closing(connection):
            connection.request("GET", "/health", headers={"Host": "localhost"})
            return connection.getresponse().status == 200
        return False

    def stop(self):
        self.process.terminate()
        self.process.wait(10)
        self.process.stderr.close()


def unverified_tls():
    """The test's self-signed certificate is its own: accept it."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


@pytest.fixture
def behind_nginx(tmp_path, redis_server, chat_process):
    """deploy/nginx.conf on a free port with a self-signed certificate, in front of two chat.py --redis."""
    nginx_binary = needed_program("nginx", "nginx")
    openssl = needed_program("openssl", "openssl")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(tmp_path / "key.pem"),
            "-out",
            str(tmp_path / "cert.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    nginx = Nginx(nginx_binary, tmp_path)
    nginx.key = ROOM_KEY  # every process of one room is given the same --key
    nginx.chat_processes = [
        chat_process(
            *("--port", "0", "--ws-port", "0", "--redis", redis_server.url),
            *("--public-url", nginx.url, "--key", nginx.key),
        )
        for _ in range(2)
    ]
    for process in nginx.chat_processes:
        process.urls()
    nginx.configure(nginx.chat_processes)
    nginx.start()
    yield nginx
    nginx.stop()


def test_browser_two_pages_behind_nginx_chat_in_one_order_over_wss_and_a_reload_misses_nothing(
    behind_nginx, open_page
):
    from playwright.sync_api import expect

    sockets = []
    link = f"{behind_nginx.url}/?key={behind_nginx.key}"
    alice, bob = (open_page(url=link, ignore_https_errors=True) for _ in range(2))
    assert alice.url == bob.url == f"{behind_nginx.url}/"  # the key went into a cookie:
    assert [(c["secure"], c["httpOnly"], c["sameSite"]) for c in alice.context.cookies()] == [
        (True, True, "Lax")  # Secure behind https
    ]
    for page in (alice, bob):
        page.on("websocket", lambda ws: sockets.append(ws.url))
    say(alice, "one")
    expect(texts(bob)).to_have_text(["one"])
    say(bob, "two")
    say(alice, "three")
    for page in (alice, bob):
        expect(texts(page)).to_have_text(["one", "two", "three"])

    bob.evaluate("location.reload()")  # mid-conversation: alice goes on while bob's page loads
    say(alice, "four")
    say(alice, "five")
    expect(bob.locator("#status")).to_have_text("online")
    say(bob, "six")
    for page in (alice, bob):
        expect(texts(page)).to_have_text(["one", "two", "three", "four", "five", "six"])
    assert sockets and all(
        url.startswith(f"wss://localhost:{behind_nginx.https_port}/ws?") for url in sockets
    )


def test_behind_nginx_a_foreign_host_and_a_foreign_origin_are_still_refused(behind_nginx):
    connection = http.client.HTTPSConnection(
        "127.0.0.1", behind_nginx.https_port, timeout=10, context=unverified_tls()
    )
    connection.request("GET", "/messages", headers={"Host": REBIND})
    response = connection.getresponse()
    assert (
        response.status == 403
        and f"--allow-host {REBIND}" in json.loads(response.read())["errors"]["host"]
    )
    connection.close()
    url = f"wss://localhost:{behind_nginx.https_port}/ws"
    assert refused_handshake(url, ssl=unverified_tls(), origin="https://evil.example") == 403


def test_behind_nginx_sigterm_closes_wss_clients_with_1001(behind_nginx, chat_process):
    url = f"wss://localhost:{behind_nginx.https_port}/ws?key={behind_nginx.key}"
    with connect(
        url, ssl=unverified_tls(), open_timeout=5, origin=behind_nginx.url, max_queue=None
    ) as ws:
        receive(ws, "history")
        for process in behind_nginx.chat_processes:
            process.process.send_signal(signal.SIGTERM)
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1001


# --- One voice per address, and a room key where strangers can reach the chat (issue 19) --
# Each client address is one person to the chat: the tests' clients use loopback addresses of
# their own (127.0.0.0/8 is all this machine), as many people would. The room key:
# Servers(key=...), as main() gives it for a --host that is not loopback or --public-url.


@pytest.fixture
def keyed_server():
    with running_servers(key=ROOM_KEY) as servers:
        yield servers


def connect_from(servers, source, path="/", query=(), **options):
    """An asyncio websocket client from address `source` (at `path`, with `query`), that reads
    whatever comes: the asyncio twin of joined()."""
    options = {"max_queue": None, "open_timeout": 5, **options}
    return async_connect(ws_url(servers, path, **dict(query)), local_addr=(source, 0), **options)


def without_refill(monkeypatch):
    """The running room's limits per address refill one message in 1000 s: within a test an
    address gets its burst and no more, however slow the machine (and a refill in between
    cannot hide a limit that is not there)."""
    monkeypatch.setattr(chat.room.message_buckets, "per_second", 0.001)


async def send_and_wait_for_answers(ws, count, name):
    """Sends `count` messages with refs; waits until each was stored or refused. How many
    were stored."""
    refs = {f"{name}-{n}" for n in range(count)}
    for ref in sorted(refs):
        await ws.send(json.dumps({"type": "message", "text": ref, "ref": ref}))
    stored = 0
    while refs:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame.get("ref") in refs and frame["type"] in ("message", "error"):
            refs.remove(frame["ref"])
            stored += frame["type"] == "message"
    return stored


def test_40_connections_of_one_address_store_no_more_than_one_connection_would(server, monkeypatch):
    without_refill(monkeypatch)

    async def run():
        clients = [await connect_from(server, "127.0.4.1") for _ in range(40)]
        stored = await asyncio.gather(
            *(send_and_wait_for_answers(ws, BURST, f"c{n}") for n, ws in enumerate(clients))
        )
        for ws in clients:
            await ws.close()
        return sum(stored)

    assert run_async(run()) == BURST  # 40 bursts of 20 were 800 messages
    assert len(stored_texts(server.port)) == BURST


def test_the_http_posts_of_an_address_share_the_limit_of_its_websockets(server, monkeypatch):
    without_refill(monkeypatch)
    with joined(server, "127.0.4.2") as (ws, _):
        for n in range(BURST):
            ws.send(f"ws {n}")
        receive_until(ws, lambda frames: len(frames) == BURST)  # its burst, stored
        statuses = [
            post(server.port, "/messages", {"text": f"http {n}"}, source="127.0.4.2")[0]
            for n in range(10)
        ]
    assert statuses == [429] * 10  # the burst was spent over websocket
    assert len(stored_texts(server.port)) == BURST


def test_an_address_past_its_limit_leaves_another_address_untouched(server):
    with joined(server, "127.0.4.3") as (flood, _):
        for n in range(3 * BURST):
            flood.send(f"flood {n}")
        assert receive(flood, "error")["error"].startswith("too many messages too fast")
        with joined(server, "127.0.4.4", name="calm") as (calm, _):
            calm.send("calm over websocket")
            receive_until(calm, lambda frames: frames and frames[-1]["name"] == "calm")
        status, _ = post(server.port, "/messages", {"text": "calm over HTTP"}, source="127.0.4.4")
    assert status == 201
    assert stored_texts(server.port)[-2:] == ["calm over websocket", "calm over HTTP"]


def presence_bytes_bound(seconds):
    """The most presence an address that joins in a loop may cost another client: each join it
    is let in for and its leave, at most 40 bytes each, and a frame's own 60 bytes at most every
    PRESENCE_EVERY; "a few KB" for 5 s."""
    joins = chat.JOIN_BURST + chat.JOINS_PER_SECOND * seconds
    return 2 * joins * 40 + (seconds / PRESENCE_EVERY + 2) * 60


def test_an_address_connecting_in_a_loop_for_5_s_costs_others_only_a_few_kb_of_presence(server):
    refusals = []

    async def join_and_leave_in_a_loop():
        began = time.monotonic()
        while time.monotonic() - began < 5 or not refusals and time.monotonic() - began < 30:
            try:
                async with connect_from(server, "127.0.4.6"):
                    pass
            except websockets.exceptions.InvalidStatus as refused:
                refusals.append(refused.response)
        return time.monotonic() - began

    with joined(server, "127.0.4.5", name="watcher") as (watcher, _):
        took = run_async(join_and_leave_in_a_loop())
        with joined(server, "127.0.4.7", name="marker"):  # presence comes in order: all came
            presence = []
            while not presence or '"joined": "marker"' not in presence[-1]:
                frame = watcher.recv(timeout=5)
                if json.loads(frame)["type"] == "presence":
                    presence.append(frame)
    cost = sum(len(frame.encode()) for frame in presence)
    assert cost <= presence_bytes_bound(took) < 11_000  # it was 275 KB a second
    assert refusals[0].status_code == 429 and refusals[0].headers["Retry-After"] == "1"
    assert b"connecting too often from your address" in refusals[0].body


def test_past_100_connections_an_address_is_refused_while_another_address_still_joins(server):
    async def run():
        clients = [await connect_from(server, "127.0.4.8") for _ in range(chat.MAX_PER_ADDRESS)]
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await connect_from(server, "127.0.4.8")
        async with connect_from(server, "127.0.4.9") as other:
            assert json.loads(await other.recv())["type"] == "history"
        for ws in clients:
            await ws.close()
        return refused.value.response

    refusal = run_async(run())
    assert refusal.status_code == 429
    assert b"100 websocket connections from your address are open already" in refusal.body

    def comes_back():
        with contextlib.suppress(websockets.exceptions.InvalidStatus), joined(server, "127.0.4.8"):
            return True  # once its join bucket lets it: the 100 were counted out
        return False

    wait_until(comes_back, what="the address getting in again once its connections closed")


def test_x_forwarded_for_of_a_handshake_from_anyone_but_the_proxy_is_ignored(
    proxied_server, monkeypatch
):
    without_refill(monkeypatch)

    async def run():
        # two connections from 127.0.0.2 that claim two addresses: one address, one limit
        claims = [{"X-Forwarded-For": address} for address in ("198.51.100.7", "198.51.100.8")]
        stored = 0
        for n, claim in enumerate(claims):
            async with connect_from(
                proxied_server, "127.0.0.2", "/ws", additional_headers=claim
            ) as ws:
                stored += await send_and_wait_for_answers(ws, BURST, f"claim{n}")
        return stored

    assert run_async(run()) == BURST


def test_behind_the_proxy_two_forwarded_addresses_get_two_limits_on_websockets_and_http(
    proxied_server, monkeypatch
):
    without_refill(monkeypatch)

    async def run(forwarded_for, name):
        # through the proxy: every connection comes from 127.0.0.1
        claim = {"X-Forwarded-For": forwarded_for}
        async with connect_from(proxied_server, "127.0.0.1", "/ws", additional_headers=claim) as ws:
            return await send_and_wait_for_answers(ws, BURST, name)

    assert run_async(run("198.51.100.1", "one")) == BURST
    statuses = flood(proxied_server.port, ["198.51.100.1"], count=10)  # its HTTP posts share it
    assert statuses == [429] * 10
    assert run_async(run("198.51.100.2", "other")) == BURST  # not the limit of the first
    assert flood(proxied_server.port, ["198.51.100.3"], count=1) == [201]


def test_one_ipv6_64_is_one_voice_behind_the_proxy_on_http_and_websockets(
    proxied_server, monkeypatch
):
    without_refill(monkeypatch)
    # one machine makes up addresses in its /64 at will: a new one for each post
    statuses = flood(proxied_server.port, [f"2001:db8:1:2::{n:x}" for n in range(1, 61)], count=60)
    assert statuses == [201] * BURST + [429] * (60 - BURST)
    assert flood(proxied_server.port, ["2001:db8:1:3::1"], count=1) == [201]  # the next /64

    async def run():
        claims = [{"X-Forwarded-For": f"2001:db8:1:4::{n}"} for n in (1, 2)]
        stored = 0
        for n, claim in enumerate(claims):
            async with connect_from(
                proxied_server, "127.0.0.1", "/ws", additional_headers=claim
            ) as ws:
                stored += await send_and_wait_for_answers(ws, BURST, f"v6-{n}")
        return stored

    assert run_async(run()) == BURST


# The room key


def with_key(way, key=ROOM_KEY):
    """A request's path suffix and headers that bring `key` in one of the three ways."""
    return {
        "query": ("?key=" + key, {}),
        "bearer": ("", {"Authorization": f"Bearer {key}"}),
        "cookie": ("", {"Cookie": f"other=1; {chat.policy.cookie_name()}={key}"}),
    }[way]


WITHOUT_THE_KEY = [
    ("none", None),
    *[(way, "wrong-key-0123456789") for way in ("query", "bearer", "cookie")],
]


@pytest.mark.parametrize("way, key", WITHOUT_THE_KEY)
@pytest.mark.parametrize("method, path", ALL_ROUTES)
def test_without_the_key_every_route_but_health_is_refused_saying_how_to_get_in(
    keyed_server, method, path, way, key
):
    suffix, headers = with_key(way, key) if key else ("", {})
    answer = request(
        keyed_server.port, method, path + suffix, {"text": "stranger"}, headers=headers
    )
    status, content_type, body = answer
    if path == "/health":
        assert status == 200
        return
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    if path in ("/", "/chat"):
        assert status == 401 and content_type == "text/html; charset=utf-8"
        assert b"Open the link the chat printed" in body and b"stranger" not in body
    else:
        assert status == 401 and content_type.startswith("application/json")
        assert "open the link the chat printed" in json.loads(body)["errors"]["key"]
    assert [m["text"] for m in chat.ask_room(chat.room.fetch(0, 100))] == []


@pytest.mark.parametrize("way, key", WITHOUT_THE_KEY)
@pytest.mark.parametrize("path", ["/", "/chat", "/ws", "/echo"])
def test_without_the_key_the_handshake_is_refused_with_401(keyed_server, path, way, key):
    suffix, headers = with_key(way, key) if key else ("", {})
    url = ws_url(keyed_server, path) + suffix
    with (
        pytest.raises(websockets.exceptions.InvalidStatus) as refused,
        connect(url, open_timeout=5, additional_headers=headers),
    ):
        pass
    assert refused.value.response.status_code == 401
    assert b"open the link the chat printed" in refused.value.response.body


@pytest.mark.parametrize("way", ["query", "bearer", "cookie"])
def test_the_key_gets_in_as_query_bearer_or_cookie_on_http_and_the_handshake(keyed_server, way):
    suffix, headers = with_key(way)
    joiner = "&" if suffix else "?"
    status, _, _ = request(
        keyed_server.port, "POST", "/messages" + suffix, {"text": way}, headers=headers
    )
    assert status == 201
    url = ws_url(keyed_server) + suffix + f"{joiner}name={way}"
    with connect(url, open_timeout=5, additional_headers=headers) as ws:
        assert [m["text"] for m in receive(ws, "history")["messages"]] == [way]


def test_a_script_with_bearer_posts_and_reads(keyed_server):
    bearer = {"Authorization": f"Bearer {ROOM_KEY}"}
    posted = request(
        keyed_server.port, "POST", "/messages", {"text": "from a script"}, headers=bearer
    )
    read = request(keyed_server.port, "GET", "/messages", headers=bearer)
    assert posted.status == 201 and read.status == 200
    assert [m["text"] for m in json.loads(read.body)["messages"]] == ["from a script"]


def test_the_link_sets_an_httponly_lax_cookie_and_redirects_to_the_page_without_the_key(
    keyed_server,
):
    answer = request(keyed_server.port, "GET", f"/chat?name=sam&key={ROOM_KEY}")
    assert answer.status == 303 and answer.headers["Location"] == "/chat?name=sam"
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(f"{chat.policy.cookie_name()}={ROOM_KEY};")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http: a Secure cookie would never come back


def test_the_key_is_not_in_config(keyed_server):
    answer = request(keyed_server.port, "GET", "/config", headers=with_key("bearer")[1])
    assert answer.status == 200 and ROOM_KEY.encode() not in answer.body


def test_browser_the_page_opened_with_the_key_comes_online_without_the_key_in_its_address(
    keyed_server, open_page
):
    from playwright.sync_api import expect

    page = open_page(url=f"http://127.0.0.1:{keyed_server.port}/?key={ROOM_KEY}", name="kim")
    assert page.url == f"http://127.0.0.1:{keyed_server.port}/"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: the page's script never sees it
    say(page, "with the key")
    expect(texts(page)).to_have_text(["with the key"])
    page.reload()
    expect(page.locator("#status")).to_have_text("online")
    expect(texts(page)).to_have_text(["with the key"])


def test_browser_without_the_key_sees_no_message(keyed_server, open_page):
    from playwright.sync_api import expect

    seed(3, name="insider")
    page = open_page(url=f"http://127.0.0.1:{keyed_server.port}/", online=False)
    expect(page.locator("h1")).to_have_text("This chat needs its room key")
    assert "m1" not in page.content() and page.locator("#chat-box").count() == 0


def test_browser_after_a_restart_with_another_key_says_to_open_the_new_link(
    chat_process, open_page
):
    from playwright.sync_api import expect

    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    first = chat_process(*ports, "--key", ROOM_KEY)
    first.urls()
    page = open_page(url=f"http://127.0.0.1:{first.port}/?key={ROOM_KEY}", name="alice")
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(5) == 0
    second = chat_process(*ports, "--key", ROOM_KEY[::-1])  # the old cookie no longer opens it
    second.urls()
    expect(page.locator("#status")).to_have_text("locked out: open the link the chat printed")


# The command line: when there is a key, and the QR code


QR_HALVES = {" ": (1, 1), "▀": (0, 1), "▄": (1, 0), "█": (0, 0)}  # (top, bottom); 1 is dark


def modules_of(url):
    """The rows of modules of `url`'s QR code as segno encodes it, quiet zone included."""
    return [list(row) for row in segno.make_qr(url).matrix_iter(scale=1, border=4)]


def qr_lines(url):
    """How many lines the QR code of `url` takes in the terminal: two rows of modules a line."""
    return (len(modules_of(url)) + 1) // 2


def shows_qr_code_of(lines, url):
    """Whether printed lines of half blocks show exactly the modules of `url`'s QR code."""
    rows = []
    for line in lines:
        halves = [QR_HALVES[block] for block in line]
        rows += [[top for top, _ in halves], [bottom for _, bottom in halves]]
    return len(lines) == qr_lines(url) and rows[: len(modules_of(url))] == modules_of(url)


def test_a_chat_on_every_address_prints_a_qr_code_of_its_first_link(chat_process):
    process = chat_process("--host", "0.0.0.0", "--port", "0", "--ws-port", "0")
    page, _ = process.urls()
    link = page.split()[-1]
    lines = []
    while len(lines) < qr_lines(link):
        line = process.lines.get(timeout=5).rstrip("\n")
        if set(line) <= set(QR_HALVES):  # after the URLs
            lines.append(line)
    assert process.key and link.endswith(f"/?key={process.key}")
    assert shows_qr_code_of(lines, link)
    assert not shows_qr_code_of(lines, link.replace(process.key, process.key[::-1]))


@pytest.mark.parametrize(
    "args",
    [
        ["--host", "0.0.0.0", "--key", ROOM_KEY],
        ["--public-url", PUBLIC, "--key", ROOM_KEY],
        ["--key", ROOM_KEY],
    ],
)
def test_key_keeps_the_link_over_a_restart(chat_process, args):
    for _ in range(2):
        process = chat_process("--port", "0", "--ws-port", "0", *args)
        page, websocket = process.urls()
        assert page.endswith(f"/?key={ROOM_KEY}\n") and websocket.endswith(f"/?key={ROOM_KEY}\n")
        assert request(process.port, "GET", "/messages")[0] == 401
        process.stop()


def test_no_key_says_that_anyone_who_can_reach_the_port_is_in(chat_process):
    process = chat_process("--host", "0.0.0.0", "--port", "0", "--ws-port", "0", "--no-key")
    page, _ = process.urls()
    assert "?key=" not in page
    line = process.lines.get(timeout=5)
    while line.startswith(("Chat page:", "Websocket:")):
        line = process.lines.get(timeout=5)
    assert line == f"No room key (--no-key): anyone who can reach port {process.port} is in.\n"
    assert request(process.port, "GET", "/messages")[0] == 200


@pytest.mark.parametrize(
    "args, error",
    [
        (["--key", "short"], "argument --key: a room key is 16 or more"),
        (["--key", "a key with spaces in it"], "argument --key: a room key is 16 or more"),
        (["--key", ROOM_KEY, "--no-key"], "--key and --no-key: choose one"),
        (
            ["--public-url", PUBLIC, "--redis", "redis://127.0.0.1:1/0"],
            "--redis where strangers can reach the chat: give every process the same --key=KEY",
        ),
    ],
)
def test_a_bad_key_flag_is_one_line_and_exit_2(chat_process, args, error):
    process = chat_process(*args)
    assert process.process.wait(15) == 2
    printed = process.process.stderr.read()
    assert printed.count("\n") == 1 and printed.startswith(f"chat.py: error: {error}")


def test_a_room_key_from_the_environment_is_the_key_and_stays_off_the_command_line(chat_process):
    process = chat_process(
        *("--port", "0", "--ws-port", "0"), env={**os.environ, "CHAT_KEY": ROOM_KEY}
    )
    process.urls()
    assert process.key == ROOM_KEY  # in the printed link
    assert ROOM_KEY not in " ".join(process.process.args)  # what `ps` shows
    assert request(process.port, "GET", "/messages")[0] == 401
    assert request(process.port, "GET", f"/messages?key={ROOM_KEY}")[0] == 200


def test_a_key_the_chat_makes_can_be_given_back_with_key_to_keep_the_link(monkeypatch):
    """A random key may begin with "-", and then `--key KEY` reads it as another option."""
    keys = iter(["-begins-with-a-dash-0", "a-room-key-with-no-dash"])
    monkeypatch.setattr(chat.secrets, "token_urlsafe", lambda _: next(keys))
    made = chat.parse_args(["--host", "0.0.0.0"]).key
    assert chat.parse_args(["--host", "0.0.0.0", "--key", made]).key == made


# --- A transient failure is not a refusal; faults behind the real nginx (issue 20) -------
# An error that sending the same message again can cure (too fast, the room away) says
# `retry_after` in its frame, and HTTP answers 503 (429 for too fast) with Retry-After; the
# page then sends it again by itself. Then kill -9 behind nginx with two pages typing, the
# systemd units in deploy/, and the fault soak.


def message_frame(text, ref):
    return json.dumps({"type": "message", "text": text, "ref": ref})


def test_a_too_fast_error_says_when_the_limit_allows_one_more_and_then_it_is_stored(server):
    with joined(server) as (ws, _):
        for n in range(2 * BURST):
            ws.send(message_frame(f"m{n}", f"r{n}"))
        answers = receive_until(ws, lambda got: len(got) == 2 * BURST, ("message", "error"))
        refused = [frame for frame in answers if frame["type"] == "error"]
        assert refused and all(0 < e["retry_after"] <= 1 / PER_SECOND for e in refused)
        last, probes = answers[-1], 0
        while last["type"] != "error":  # a refill let the last ones in: one more, refused
            probes += 1
            ws.send(message_frame("probe", f"probe{probes}"))
            last = receive_until(ws, lambda got: got, ("message", "error"))[0]
        threading.Event().wait(last["retry_after"])  # no frame of ours came after it
        ws.send(message_frame("again", last["ref"]))
        again = receive_until(ws, lambda got: got, ("message", "error"))[0]
        assert again["type"] == "message" and again["ref"] == last["ref"]


def test_a_refusal_that_sending_again_cannot_cure_has_no_retry_after(server):
    with joined(server) as (ws, _):
        for frame in [message_frame("x" * 2001, "long"), message_frame("hi", 7), '{"type": 1}']:
            ws.send(frame)
            assert "retry_after" not in receive(ws, "error")
        ws.send(b"binary")
        assert "retry_after" not in receive(ws, "error")


def test_a_post_the_busy_loop_cannot_answer_in_time_says_retry_after(server, monkeypatch):
    monkeypatch.setattr(chat, "HTTP_WAIT", 0.2)
    busy = threading.Event()
    server.loop.call_soon_threadsafe(busy.wait, 10)  # busy until the 503 came, however slow
    try:
        response = request(server.port, "POST", "/messages", {"text": "too late", "ref": "late"})
    finally:
        busy.set()
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    monkeypatch.setattr(chat, "HTTP_WAIT", 5)
    assert post(server.port, "/messages", {"text": "too late", "ref": "late"})[0] == 201
    assert stored_texts(server.port) == ["too late"]


def test_redis_away_says_retry_after_and_the_same_ref_goes_through_once_it_is_back(
    redis_server, two_processes
):
    a, b = two_processes
    with connect(f"ws://127.0.0.1:{a.ws_port}/", open_timeout=5, max_queue=None) as ws:
        receive(ws, "history")
        redis_server.stop()
        ws.send(message_frame("while away", "away-1"))
        error = receive(ws, "error")
        assert error["ref"] == "away-1" and error["retry_after"] == 1
        response = request(b.port, "POST", "/messages", {"text": "while away", "ref": "away-1"})
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        redis_server.start()
        for _ in range(20):  # what the page does: the same ref again, after retry_after
            ws.send(message_frame("while away", "away-1"))
            answer = receive_until(ws, lambda got: got, ("message", "error"))[0]
            if answer["type"] == "message":
                break
            threading.Event().wait(answer["retry_after"])
        assert answer["ref"] == "away-1"
    assert post(b.port, "/messages", {"text": "while away", "ref": "away-1"})[0] == 200
    assert stored_texts(a.port) == ["while away"]


def test_browser_a_paste_of_30_quick_sends_all_go_through_in_order_without_a_click(
    server, open_page, monkeypatch
):
    from playwright.sync_api import expect

    monkeypatch.setattr(chat, "BURST", 3)  # past the burst at once, so most wait for the limit
    page = open_page(server.port)
    page.evaluate("""() => {
        const form = document.getElementById("chat-form");
        for (let n = 0; n < 30; n++) {
            document.getElementById("message-input").value = "burst " + n;
            form.requestSubmit();
        }
    }""")
    expect(page.locator("#outbox .message.failed")).to_have_count(0)
    expected = [f"burst {n}" for n in range(30)]
    expect(texts(page)).to_have_text(expected, timeout=30_000)
    expect(page.locator("#outbox .message")).to_have_count(0)
    assert stored_texts(server.port) == expected


def test_browser_a_refusal_for_good_keeps_send_again_and_edit_and_the_next_one_goes(
    server, open_page
):
    from playwright.sync_api import expect

    page = open_page(server.port)
    page.evaluate("""() => {
        document.getElementById("message-input").value = "half an emoji \\ud83d";
        document.getElementById("chat-form").requestSubmit();
    }""")
    failed = page.locator("#outbox .message.failed")
    expect(failed).to_contain_text("Not sent: text is not valid Unicode")
    expect(failed.get_by_role("button", name="Send again")).to_be_visible()
    expect(failed.get_by_role("button", name="Edit")).to_be_visible()
    say(page, "the next one")
    expect(texts(page)).to_have_text(["the next one"])
    expect(failed).to_have_count(1)


def test_browser_what_is_typed_while_redis_is_away_goes_when_it_is_back_without_a_click(
    redis_server, two_processes, open_page
):
    from playwright.sync_api import expect

    a, _ = two_processes
    page = open_page(a.port, "alice")
    redis_server.stop()
    for n in range(3):
        say(page, f"away {n}")
    waiting = page.locator("#outbox .message")
    expect(waiting).to_have_count(3)
    expect(waiting.first).to_contain_text("Not sent yet: the chat asked to wait a moment")
    redis_server.start()
    expect(texts(page)).to_have_text(["away 0", "away 1", "away 2"], timeout=20_000)
    expect(page.locator("#outbox .message")).to_have_count(0)
    assert stored_texts(a.port) == ["away 0", "away 1", "away 2"]


KEEP_TYPING = """(who) => {
    window.typed = [];
    window.typing = setInterval(() => {
        typed.push(`${who} ${typed.length}`);
        document.getElementById("message-input").value = typed.at(-1);
        document.getElementById("chat-form").requestSubmit();
    }, 300);
}"""
OWN_STORED = "() => document.querySelectorAll('#chat-box .message.own').length"
SHOWN_MESSAGES = """() => [...document.querySelectorAll("#chat-box .message")]
    .map((item) => [Number(item.dataset.id), item.querySelector(".text").textContent])"""


def typed_on(pages, more=3, timeout=30_000):
    """Waits until each page has `more` of its own messages stored (shown as messages) than now."""
    for page in pages:
        count = page.evaluate(OWN_STORED)
        page.wait_for_function(f"(n) => ({OWN_STORED})() >= n", arg=count + more, timeout=timeout)


def clients_on(process):
    return get(process.port, "/health")[1]["clients"]


@pytest.mark.timeout(240)
def test_behind_nginx_kill_9_of_a_chat_process_and_of_redis_with_two_pages_typing_loses_nothing(
    behind_nginx, redis_server, chat_process, open_page
):
    from playwright.sync_api import expect

    link = f"{behind_nginx.url}/?key={behind_nginx.key}"  # the link the chat prints
    pages = [open_page(url=link, ignore_https_errors=True) for _ in range(2)]
    for page, who in zip(pages, ("alice", "bob"), strict=True):
        page.evaluate(KEEP_TYPING, who)
    typed_on(pages)

    # (a) kill -9 of the process that holds the pages' connections: they come back to the other
    a, b = behind_nginx.chat_processes
    victim, survivor = (a, b) if clients_on(a) >= clients_on(b) else (b, a)
    assert clients_on(victim) >= 1
    victim.process.kill()
    victim.process.wait(5)
    wait_for_health(survivor.port, timeout=30, clients=2)
    typed_on(pages)

    # (b) kill -9 of redis-server: what is typed meanwhile waits; then it restarts with its data
    redis_server.process.kill()
    redis_server.process.wait(5)
    # online, the chat asks the page to wait ("later"); offline a moment, it waits ("waiting")
    pages[0].wait_for_function(
        "() => document.querySelector('#outbox .message.later, #outbox .message.waiting')"
    )
    redis_server.start()
    typed_on(pages)

    # (c) the killed process started again on its ports: it rejoins the room
    again = chat_process(
        *("--port", str(victim.port), "--ws-port", str(victim.ws_port)),
        *("--redis", redis_server.url, "--public-url", behind_nginx.url, "--key", behind_nginx.key),
    )
    again.urls()
    typed_on(pages)

    typed = []
    for page in pages:
        typed.append(page.evaluate("() => (clearInterval(typing), typed)"))
        expect(page.locator("#outbox .message")).to_have_count(0, timeout=30_000)
    every_message = f"/messages?limit=1000&key={behind_nginx.key}"
    stored = get(survivor.port, every_message)[1]["messages"]
    texts_stored = [message["text"] for message in stored]
    assert collections.Counter(texts_stored) == collections.Counter(typed[0] + typed[1])
    for own in typed:  # each person's messages in the order typed
        assert [text for text in texts_stored if text in set(own)] == own
    wait_for_health(again.port, last_id=stored[-1]["id"])
    assert get(again.port, every_message)[1]["messages"] == stored
    order = [[message["id"], message["text"]] for message in stored]
    for page in pages:  # one order on both pages, each showing the newest messages
        page.wait_for_function(
            f"(id) => ({SHOWN_MESSAGES})().at(-1)?.[0] === id", arg=stored[-1]["id"]
        )
        shown = page.evaluate(SHOWN_MESSAGES)
        assert shown == order[-len(shown) :]


def test_behind_nginx_once_each_process_was_killed_in_turn_new_websockets_still_get_through(
    behind_nginx, redis_server, chat_process
):
    """nginx must not keep a process it once found dead marked down (max_fails=0)."""
    url = f"wss://localhost:{behind_nginx.https_port}/ws?key={behind_nginx.key}"
    through_nginx = functools.partial(
        connect, url, ssl=unverified_tls(), open_timeout=5, origin=behind_nginx.url
    )
    a, b = behind_nginx.chat_processes
    a.process.kill()
    a.process.wait(5)
    with through_nginx() as ws:  # to b, once nginx found a refusing
        receive(ws, "history")
    chat_process(
        *("--port", str(a.port), "--ws-port", str(a.ws_port)),
        *("--redis", redis_server.url, "--public-url", behind_nginx.url, "--key", behind_nginx.key),
    ).urls()
    b.process.kill()
    b.process.wait(5)
    with through_nginx() as first, through_nginx() as second:  # both to a, back again
        receive(first, "history")
        receive(second, "history")


DEPLOY = CHAT_PY.with_name("deploy")
UNIT = DEPLOY / "chat@.service"


def environment_file(path):
    """The KEY=VALUE lines of a systemd EnvironmentFile (no quotes are used in ours)."""
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def unit_command_line(environment):
    """The unit's ExecStart as systemd runs it: ${NAME} is one word, $NAME splits into words."""
    (line,) = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    words = []
    for word in shlex.split(line.removeprefix("ExecStart=")):
        if one := re.fullmatch(r"\$\{(\w+)\}", word):
            words.append(environment[one[1]])
        elif split := re.fullmatch(r"\$(\w+)", word):
            words += environment[split[1]].split()
        else:
            assert "$" not in word, f"a variable inside a word, which this test cannot read: {word}"
            words.append(word)
    return words


def test_systemd_unit_passes_systemd_analyze_verify_and_security(tmp_path):
    analyze = needed_program("systemd-analyze", "systemd")
    unit = UNIT.read_text()  # with the chat where it is here, so that its ExecStart exists
    for installed, here in [
        ("/opt/chat/venv/bin/python", sys.executable),
        ("/opt/chat", CHAT_PY.parent),
    ]:
        assert installed in unit
        unit = unit.replace(installed, str(here))
    (tmp_path / UNIT.name).write_text(unit)
    for check in [["verify"], ["security", "--offline=yes", "--threshold=20"]]:
        result = subprocess.run(
            [analyze, *check, str(tmp_path / "chat@1.service")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert check != ["verify"] or result.stderr == ""  # unknown keys are only warned about


@pytest.mark.parametrize("instance", ["1", "2"])
def test_systemd_unit_command_line_is_one_chat_py_accepts_on_the_ports_nginx_uses(
    instance, monkeypatch
):
    environment = {
        **environment_file(DEPLOY / "chat" / "chat.env"),
        **environment_file(DEPLOY / "chat" / f"{instance}.env"),
        "CHAT_KEY": ROOM_KEY,  # as docs/online.md has it put there
    }
    python, script, *arguments = unit_command_line(environment)
    assert (python, script) == ("/opt/chat/venv/bin/python", "/opt/chat/chat.py")
    assert ROOM_KEY not in " ".join(arguments)  # in the environment, out of `ps`
    monkeypatch.setenv("CHAT_KEY", ROOM_KEY)  # as systemd gives it, from the EnvironmentFile
    args = chat.parse_args(arguments)
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert f"server 127.0.0.1:{args.port} " in nginx
    assert f"server 127.0.0.1:{args.ws_port} " in nginx
    assert args.redis == "redis://127.0.0.1:6379/0" and args.public_url == PUBLIC
    assert args.key == ROOM_KEY
    more = {**environment, "CHAT_ARGS": "--history 5000"}
    assert chat.parse_args(unit_command_line(more)[2:]).history == 5000


@pytest.mark.timeout(150)
def test_fault_soak_briefly_kills_each_part_and_loses_duplicates_and_reorders_nothing():
    needed_program("redis-server", "redis-server")
    soak = subprocess.run(
        [sys.executable, str(CHAT_PY.with_name("soak_chat.py")), "--seconds", "10", "--every", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert soak.returncode == 0, soak.stdout + soak.stderr[-3000:]
    kills = re.search(
        r"faults: (\d+) kill -9 of a chat process, (\d+) of redis-server", soak.stdout
    )
    assert kills and int(kills[1]) >= 1 and int(kills[2]) >= 1
    assert soak.stdout.count("lost 0, duplicated 0, reordered 0") == 2  # typed, and delivered
    assert "pending at the end: 0;" in soak.stdout


# --- The page keeps every promise to the person typing (issue 13) ----------------------

PHONE = {"viewport": {"width": 375, "height": 667}, "is_mobile": True, "has_touch": True}
AXE = Path(__file__).with_name("node_modules") / "axe-core" / "axe.min.js"


class Relay:
    """A TCP relay in front of the websocket port that can go silent, as a proxy or a Wi-Fi
    drop does: the connections it carries stay open, and what is sent on them is lost.
    New connections are carried as usual."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.closing = threading.Event()
        self.sockets, self.silences, self.threads = [], [], []
        self.silent_from_the_start = False
        self.accepted = threading.Semaphore(0)  # released once per connection carried
        self.start(self.accept)

    def start(self, target, *args):
        thread = threading.Thread(target=target, args=args)
        self.threads.append(thread)
        thread.start()

    def accept(self):
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            to_server, to_page = threading.Event(), threading.Event()
            if self.silent_from_the_start:
                to_server.set()
                to_page.set()
            self.sockets += [client, upstream]
            self.silences.append((to_server, to_page))
            self.start(self.pump, client, upstream, to_server)
            self.start(self.pump, upstream, client, to_page)
            self.accepted.release()

    def pump(self, source, sink, silent):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not silent.is_set():
                    sink.sendall(data)

    def go_silent(self, to_server=True, to_page=True):
        """From now on the connections open now carry nothing (in the directions asked)."""
        for towards_server, towards_page in self.silences:
            if to_server:
                towards_server.set()
            if to_page:
                towards_page.set()

    def wait_for_connection(self):
        assert self.accepted.acquire(timeout=10), "no new connection came through the relay"

    def close(self):
        self.closing.set()
        for each in self.sockets:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
            each.close()
        for thread in self.threads:
            thread.join(5)
        self.listener.close()


@pytest.fixture
def relay(server):
    """The page connects through a Relay: /config and the page's policy name its port."""
    relay = Relay(server.ws_port)
    real_port, chat.room.ws_port = chat.room.ws_port, relay.port
    yield relay
    chat.room.ws_port = real_port
    relay.close()


def record_statuses(page):
    page.evaluate("""() => {
        window.statuses = [];
        new MutationObserver(() => statuses.push(document.getElementById("status").textContent))
            .observe(document.getElementById("status"), {childList: true, characterData: true, subtree: true});
    }""")


@pytest.mark.parametrize("lost", ["both ways", "answers only"])
def test_browser_notices_a_silent_connection_and_sends_what_was_pending_once(
    server, relay, open_page, lost
):
    """The relay stops forwarding: either the message never reaches the server, or it is
    stored and only the answer is lost. Either way it is pending until stored, the status
    leaves "online" within 30 s (the heartbeat), and after the reconnect it is stored once."""
    from playwright.sync_api import expect

    page = open_page(server.port, "alice", clock=True)
    record_statuses(page)
    relay.go_silent(to_server=lost == "both ways")
    say(page, "through the gap")
    expect(page.locator("#outbox .message")).to_contain_text("through the gap")
    expect(page.locator("#outbox .state")).to_have_text("Sending…")
    if lost == "answers only":
        wait_for_health(server.port, messages=1)  # stored; the page has not heard so
    assert stored_texts(server.port) == ([] if lost == "both ways" else ["through the gap"])

    page.clock.run_for(30_000)  # two heartbeats without an answer: the connection is dead
    expect(texts(page)).to_have_text(["through the gap"])
    expect(page.locator("#outbox .message")).to_have_count(0)
    expect(page.locator("#status")).to_have_text("online")
    assert "reconnecting…" in page.evaluate("statuses")
    assert stored_texts(server.port) == ["through the gap"]


def test_browser_gives_up_a_connection_that_never_opens_and_tries_again(server, relay, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice", clock=True)
    relay.wait_for_connection()
    relay.silent_from_the_start = True  # a proxy that takes connections and never answers
    relay.go_silent()
    page.clock.run_for(30_000)
    expect(page.locator("#status")).to_have_text("reconnecting…")
    relay.wait_for_connection()  # the next attempt hangs in its opening handshake
    relay.silent_from_the_start = False
    page.clock.run_for(30_000)
    relay.wait_for_connection()  # given up, and tried again
    expect(page.locator("#status")).to_have_text("online")


def test_browser_keeps_what_is_typed_while_offline_and_sends_it_when_back(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    page.context.set_offline(True)
    expect(page.locator("#status")).to_have_text("reconnecting…")
    say(page, "typed offline")
    expect(page.locator("#outbox .state")).to_contain_text("Not sent yet")
    page.context.set_offline(False)
    expect(texts(page)).to_have_text(["typed offline"])
    expect(page.locator("#outbox .message")).to_have_count(0)
    assert stored_texts(server.port) == ["typed offline"]


def test_browser_too_long_text_stays_in_the_box_with_a_reason(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)
    say(page, "x" * 2001)
    expect(page.locator("#chat-error")).to_have_text("Too long: 2001 characters, at most 2000.")
    expect(page.locator("#message-input")).to_have_value("x" * 2001)


def test_browser_own_messages_are_known_by_ref_not_by_name(server, open_page):
    from playwright.sync_api import expect

    first, second = open_page(server.port, "sam"), open_page(server.port, "sam")
    say(first, "from the first sam")
    expect(texts(second)).to_have_text(["from the first sam"])
    expect(second.locator("#chat-box .message.own")).to_have_count(0)
    first.fill("#name-input", "samuel")
    first.dispatch_event("#name-input", "change")
    expect(first.locator("#chat-box .notice").last).to_have_text("sam is now samuel")
    expect(first.locator("#chat-box .message.own .text")).to_have_text(["from the first sam"])


def layout_reads_script():
    """Counts the page's reads of layout (each can force the browser to lay the page out)."""
    return """
        window.layoutReads = 0;
        for (const key of ["scrollHeight", "scrollTop", "clientHeight", "offsetHeight", "offsetTop"]) {
            const real = Object.getOwnPropertyDescriptor(Element.prototype, key)
                || Object.getOwnPropertyDescriptor(HTMLElement.prototype, key);
            const owner = Element.prototype.hasOwnProperty(key) ? Element.prototype : HTMLElement.prototype;
            Object.defineProperty(owner, key, {...real, get() { window.layoutReads += 1; return real.get.call(this); }});
        }
        const rect = Element.prototype.getBoundingClientRect;
        Element.prototype.getBoundingClientRect = function () { window.layoutReads += 1; return rect.call(this); };
    """


def test_browser_draws_the_history_in_one_batch_without_reading_layout_per_message(server, browser):
    from playwright.sync_api import expect

    seed(50)
    context = browser.new_context()
    try:
        context.add_init_script("localStorage.setItem('chat-name', 'reader')")  # joins at once
        context.add_init_script(layout_reads_script())
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/")
        expect(page.locator("#chat-box .message")).to_have_count(50)
        # A few reads for the whole batch (the scroll position, the box's size), not one per message.
        assert page.evaluate("layoutReads") < 50
        assert at_bottom(page)
    finally:
        context.close()


AT_BOTTOM = (
    "() => { const log = document.getElementById('log'); "
    "return log.scrollHeight - log.scrollTop - log.clientHeight < 2; }"
)


def at_bottom(page):
    """The message log is scrolled to its end."""
    return page.evaluate(AT_BOTTOM)


def test_browser_on_a_phone_stays_at_the_bottom_and_shows_own_messages(server, open_page):
    from playwright.sync_api import expect

    seed(50)
    page = open_page(server.port, "alice", **PHONE)
    expect(texts(page)).to_have_count(50)
    expect(texts(page).last).to_be_in_viewport()
    assert at_bottom(page)
    say(page, "mine\nwith\nseveral\nlines")
    expect(texts(page).last).to_have_text("mine\nwith\nseveral\nlines")
    expect(texts(page).last).to_be_in_viewport()
    say(page, "x" * 2001)  # the error line appears and the log gets shorter
    expect(page.locator("#chat-error")).to_be_visible()
    page.wait_for_function(AT_BOTTOM)


def test_browser_shows_a_new_messages_button_when_scrolled_up(server, open_page):
    from playwright.sync_api import expect

    seed(50)
    page = open_page(server.port)
    expect(texts(page)).to_have_count(50)
    page.locator("#log").evaluate("log => log.scrollTop = 0")
    post(server.port, "/messages", {"text": "while you read"})
    button = page.get_by_role("button", name="New messages")
    expect(button).to_be_visible()
    expect(texts(page).last).not_to_be_in_viewport()
    button.click()
    expect(texts(page).last).to_be_in_viewport()
    expect(button).to_be_hidden()


def test_browser_always_shows_ones_own_message_even_when_scrolled_up(server, open_page):
    from playwright.sync_api import expect

    seed(50)
    page = open_page(server.port)
    expect(texts(page)).to_have_count(50)
    page.locator("#log").evaluate("log => log.scrollTop = 0")
    say(page, "mine")
    expect(texts(page).last).to_have_text("mine")
    expect(texts(page).last).to_be_in_viewport()


def test_browser_counts_unread_messages_in_the_title_while_hidden(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)
    set_hidden = """hidden => {
        Object.defineProperty(document, "hidden", {value: hidden, configurable: true});
        document.dispatchEvent(new Event("visibilitychange"));
    }"""
    page.evaluate(set_hidden, True)
    for text in ["one", "two"]:
        post(server.port, "/messages", {"text": text})
    expect(page).to_have_title("(2) chat")
    page.evaluate(set_hidden, False)
    expect(page).to_have_title("chat")


def test_browser_pasted_lines_are_kept(server, open_page):
    """(Enter and Shift+Enter: in every engine, below. Pasting is Playwright's insert_text.)"""
    from playwright.sync_api import expect

    page = open_page(server.port)
    page.locator("#message-input").focus()
    page.keyboard.insert_text("pasted 1\npasted 2\npasted 3")
    page.keyboard.press("Enter")
    expect(texts(page)).to_have_text(["pasted 1\npasted 2\npasted 3"])
    assert stored_texts(server.port) == ["pasted 1\npasted 2\npasted 3"]


def test_browser_online_list_on_a_phone_is_a_count_that_opens_on_tap(server, open_page):
    from playwright.sync_api import expect

    with contextlib.ExitStack() as stack:
        for n in range(40):
            stack.enter_context(joined(server, name=f"person {n}"))
        page = open_page(server.port, "alice", **PHONE)
        summary = page.locator("#online-count")
        expect(summary).to_have_text("41 online")
        expect(page.locator("#online")).to_be_hidden()
        assert page.locator("aside").bounding_box()["height"] < 60
        summary.tap()
        expect(page.locator("#online li")).to_have_count(41)
        expect(page.locator("#online li").first).to_be_visible()


def run_axe(page):
    """axe-core's violations on the page as it is now (axe-core comes from npm: npm ci)."""
    if not AXE.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("the accessibility tests must run under CI: npm ci")
        pytest.skip("no axe-core: npm ci")
    page.evaluate(AXE.read_text())
    violations = page.evaluate("async () => (await axe.run()).violations")
    return [(v["id"], v["impact"], [node["target"] for node in v["nodes"]]) for v in violations]


WORKSHOP_STATES = [
    "code and a right-to-left name",
    "code on a dark phone",
    "offline",
    "first visit",
]


@pytest.mark.parametrize("state", ["dark scheme", *WORKSHOP_STATES])
def test_browser_page_has_no_accessibility_violations(server, open_page, state):
    """Chromium only: Playwright emulates the dark scheme, a phone and going offline. The
    empty room, a busy room, an error and the phone, in every engine:
    test_every_engine_page_has_no_accessibility_violations."""
    from playwright.sync_api import expect

    options = {
        "dark scheme": {"color_scheme": "dark"},
        "code on a dark phone": {**PHONE, "color_scheme": "dark"},
    }.get(state, {})
    if state == "first visit":
        page = open_page(server.port, online=False)
        expect(page.get_by_role("button", name="Join")).to_be_visible()
        assert run_axe(page) == []
        return
    if state == "dark scheme":
        seed(50)
    page = open_page(server.port, "alice", **options)
    if state.startswith("code"):
        post(server.port, "/messages", {"name": RTL_NAME, "text": CODE_MESSAGE + "\n" + RTL_TEXT})
        expect(page.locator("#chat-box pre")).to_be_visible()
    if state == "offline":
        page.context.set_offline(True)
        expect(page.locator("#offline")).to_be_visible()
    if state == "dark scheme":
        expect(texts(page)).to_have_count(50)
        say(page, "mine, see https://example.org")
        expect(texts(page).last).to_have_text("mine, see https://example.org")
    assert run_axe(page) == []


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_browser_inputs_have_a_border_contrast_of_at_least_3(server, open_page, scheme):
    page = open_page(server.port, color_scheme=scheme)
    ratios = page.evaluate("""() => {
        const luminance = (color) => {
            const [r, g, b] = color.match(/\\d+/g).slice(0, 3).map((c) => {
                c /= 255;
                return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
            });
            return 0.2126 * r + 0.7152 * g + 0.0722 * b;
        };
        const contrast = (a, b) => {
            const [light, dark] = [luminance(a), luminance(b)].sort((x, y) => y - x);
            return (light + 0.05) / (dark + 0.05);
        };
        const panel = getComputedStyle(document.getElementById("chat-form")).backgroundColor;
        return ["name-input", "message-input"].map((id) => {
            const style = getComputedStyle(document.getElementById(id));
            return Math.min(contrast(style.borderTopColor, panel), contrast(style.borderTopColor, style.backgroundColor));
        });
    }""")
    assert min(ratios) >= 3, ratios


def test_browser_status_is_read_as_a_word_without_a_bullet(server, open_page):
    page = open_page(server.port)
    assert page.locator("#status").aria_snapshot() == "- status: online"


def test_browser_takes_history_in_pieces_and_presence_changes_from_the_ws_path(server, open_page):
    """Frames in their new form (history pieces with `more` and `online`, presence with only
    `changes`) from a scripted websocket where /config's `ws_path` points."""
    from playwright.sync_api import expect

    sockets = []

    def prepare(context):
        def config(route):
            answer = route.fetch().json()
            route.fulfill(json={**answer, "ws_path": "/ws"})

        context.route("**/config", config)
        context.route_web_socket("**/ws?*", lambda ws: sockets.append(ws))

    page = open_page(server.port, "alice", prepare=prepare, online=False)
    wait_in_page(page, lambda: sockets, timeout=5)  # Playwright calls the route meanwhile
    ws = sockets[0]
    assert ws.url.startswith(f"ws://127.0.0.1:{server.port}/ws?")

    def message(n):
        return {
            "type": "message",
            "id": n,
            "name": "bob",
            "text": f"m{n}",
            "ts": "2026-11-23T14:05:09.123Z",
        }

    first = {
        "type": "history",
        "room": "r",
        "name": "alice",
        "messages": [message(1), message(2)],
        "more": True,
        "online": ["carol", "bob"],
    }
    ws.send(json.dumps(first))
    expect(texts(page)).to_have_text(["m1", "m2"])
    expect(page.locator("#status")).not_to_have_text("online")  # not before the last piece
    ws.send(
        json.dumps(
            {
                "type": "history",
                "room": "r",
                "name": "alice",
                "messages": [message(3)],
                "more": False,
            }
        )
    )
    expect(page.locator("#status")).to_have_text("online")
    ws.send(json.dumps({"type": "presence", "joined": "alice", "changes": [{"joined": "alice"}]}))
    expect(page.locator("#online li")).to_have_text(["alice (you)", "bob", "carol"])
    changes = [
        {"left": "bob"},
        {"renamed": {"from": "carol", "to": "caroline"}},
        {"joined": "dave"},
    ]
    ws.send(json.dumps({"type": "presence", "changes": changes}))
    expect(page.locator("#online li")).to_have_text(["alice (you)", "caroline", "dave"])
    expect(page.locator("#online-count")).to_have_text("3 online")
    expect(texts(page)).to_have_text(["m1", "m2", "m3"])


def test_page_benchmark_runs_and_reports_each_level(browser):
    import bench_page

    costs = bench_page.per_append(browser, [50, 100])
    assert sorted(costs) == [50, 100] and all(cost > 0 for cost in costs.values())
    lag = bench_page.lag(browser, rate=100, seconds=1)
    assert lag["behind_at_end_s"] <= lag["worst_lag_s"]


# --- The page: renaming, the connection gone, scrolling ---------------------------------


def test_browser_rename_reaches_the_room_and_is_remembered_after_a_reload(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)  # a guest: no name remembered yet
    with joined(server, name="watcher") as (watcher, _):
        receive(watcher, "presence")  # its own join
        page.fill("#name-input", "alicia")
        page.press("#name-input", "Tab")  # the name is taken when the field is left
        assert presence_frames(watcher, 1)[0]["changes"][0]["renamed"]["to"] == "alicia"
    page.reload()
    expect(page.locator("#status")).to_have_text("online")
    expect(page.locator("#name-input")).to_have_value("alicia")
    with joined(server, name="watcher") as (watcher, _):
        say(page, "back again")
        assert receive(watcher, "message")["name"] == "alicia"


def test_browser_follows_new_messages_unless_the_reader_scrolled_up(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "reader")
    box = page.locator("#log")  # the scrolling region around the list #chat-box
    seed(60)  # more than the box shows at once
    expect(box).to_contain_text("m60")
    page.wait_for_function(AT_BOTTOM)  # it followed
    assert box.evaluate("box => box.scrollHeight > box.clientHeight")

    box.evaluate("box => { box.scrollTop = 0; }")  # the reader goes back to read
    post(server.port, "/messages", {"text": "while reading"})
    expect(box).to_contain_text("while reading")
    assert box.evaluate("box => box.scrollTop") == 0  # not pulled away from what they read

    box.evaluate("box => { box.scrollTop = box.scrollHeight; }")  # back at the bottom
    post(server.port, "/messages", {"text": "follow again"})
    expect(box).to_contain_text("follow again")
    page.wait_for_function(AT_BOTTOM)


# --- The page in every engine: Chromium, Firefox, WebKit ---------------------------------
# One set of tests of the page's promises, run in each engine (engines.py: Playwright for
# Chromium, WebDriver BiDi for Firefox, Selenium and WebKitWebDriver for WebKit), each browser
# started once per run. `-k firefox` runs one engine's alone. Many Chromium-only tests above use
# what only Playwright or Chromium can do: a fake clock, going offline, routes, CDP's metrics.

ONLINE = "() => document.getElementById('status').textContent === 'online'"
TEXTS = "() => [...document.querySelectorAll('#chat-box .message .text')].map((t) => t.textContent)"
OWN_TEXTS = (
    "() => [...document.querySelectorAll('#chat-box .message.own .text')].map((t) => t.textContent)"
)
OUTBOX = "() => [...document.querySelectorAll('#outbox .message')].map((m) => m.textContent)"
# Anything that goes wrong in the page without a word: an exception, a refused script or style.
WATCH_PROBLEMS = """() => {
    window.problems = [];
    addEventListener("error", (event) => problems.push(`error: ${event.message}`));
    addEventListener("unhandledrejection", (event) => problems.push(`rejected: ${event.reason}`));
    document.addEventListener("securitypolicyviolation",
        (event) => problems.push(`policy: ${event.violatedDirective}`));
}"""


@pytest.fixture(scope="session", params=engines.ENGINES)
def engine(request):
    """Each engine once per run (pytest runs the tests of one engine together)."""
    if request.param == "chromium":
        yield engines.Chromium(request.getfixturevalue("browser"))
        return
    missing = engines.missing(request.param)
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests must run under CI: {missing}")
        pytest.skip(missing)
    started = engines.start(request.param)
    yield started
    started.close()


@pytest.fixture
def open_tab(engine):
    """Opens the chat in `engine` as a new person; fails the test on any error in the page."""
    tabs = []

    def open_as(port, name, viewport=None):
        """A returning visitor (`name` kept in localStorage), so the page joins at once."""
        tab = engine.new_tab(name=name, viewport=viewport)
        tabs.append(tab)
        tab.goto(f"http://127.0.0.1:{port}/")
        tab.evaluate(WATCH_PROBLEMS)
        tab.wait_for(ONLINE, what="the status 'online'")
        return tab

    yield open_as
    problems = []
    for tab in tabs:
        try:
            problems += tab.evaluate("() => window.problems || []")
        finally:
            tab.close()
    assert problems == []


def shows(tab, function, expected, *args, timeout=10):
    """Waits until `function(*args)` in the page gives `expected`; fails showing what it gave."""
    shown = []

    def gives_expected():
        shown[:] = [tab.evaluate(function, *args)]
        return shown[0] == expected

    try:
        wait_until(gives_expected, timeout)  # as wait_for_health() waits
    except AssertionError:
        raise AssertionError(f"the page shows {shown[0]!r}, not {expected!r}") from None


def type_into(tab, text, box="message-input"):
    """Focuses the box and types `text` into it, key by key (no key for a line break here)."""
    tab.evaluate("(id) => document.getElementById(id).focus()", box)
    tab.type(text)


def say_in(tab, text):
    """Puts `text` in the message box (as a paste would) and presses Enter."""
    tab.evaluate(
        "(text) => { const box = document.getElementById('message-input');"
        " box.focus(); box.value = text; box.dispatchEvent(new Event('input')); }",
        text,
    )
    tab.press("Enter")


def test_every_engine_the_page_comes_online_with_its_name(server, open_tab):
    tab = open_tab(server.port, "alice")
    shows(tab, "() => document.getElementById('name-input').value", "alice")
    shows(
        tab,
        "() => [...document.querySelectorAll('#online li')].map((li) => li.textContent)",
        ["alice (you)"],  # the online list marks oneself
    )


def test_every_engine_enter_sends_and_shift_enter_adds_a_line(server, open_tab):
    tab = open_tab(server.port, "alice")
    type_into(tab, "first line")
    tab.press("Shift+Enter")
    tab.type("second line")
    shows(tab, "() => document.getElementById('message-input').value", "first line\nsecond line")
    assert stored_texts(server.port) == []  # Shift+Enter sent nothing
    tab.press("Enter")
    shows(tab, TEXTS, ["first line\nsecond line"])
    shows(tab, "() => document.getElementById('message-input').value", "")
    assert stored_texts(server.port) == ["first line\nsecond line"]


def test_every_engine_own_message_is_stored_once_and_shown_once_as_own(server, open_tab):
    tab = open_tab(server.port, "alice")
    post(server.port, "/messages", {"name": "alice", "text": "the same name, not mine"})
    shows(tab, TEXTS, ["the same name, not mine"])
    say_in(tab, "mine")
    shows(tab, TEXTS, ["the same name, not mine", "mine"])
    shows(tab, OWN_TEXTS, ["mine"])
    shows(tab, OUTBOX, [])
    assert stored_texts(server.port) == ["the same name, not mine", "mine"]


def test_every_engine_shows_markup_as_text_runs_nothing_and_links_get_rel(server, open_tab):
    tab = open_tab(server.port, "mallory")
    attacks = ['<img src=x onerror="window.pwned=1">', "<script>window.pwned=1</script>"]
    for attack in attacks:
        say_in(tab, attack)
    shows(tab, TEXTS, attacks)  # stored before the HTTP post, which could overtake them
    other = "<svg onload=window.pwned=1> see https://example.org/a?b=1. not javascript:alert(1)"
    post(server.port, "/messages", {"name": "<i onmouseover=alert(1)>x</i>", "text": other})
    shows(tab, TEXTS, [*attacks, other])
    shows(tab, OWN_TEXTS, attacks)
    assert (
        tab.evaluate(
            "() => document.querySelector('#chat-box .message:last-child strong').textContent"
        )
        == "<i onmouseover=alert(1)>x</i>"
    )
    assert (
        tab.evaluate(
            "() => document.querySelectorAll('#chat-box img, #chat-box script, #chat-box svg,"
            " #chat-box i').length"
        )
        == 0
    )
    assert tab.evaluate("() => window.pwned === undefined")
    links = tab.evaluate(
        "() => [...document.querySelectorAll('#chat-box a')].map((a) =>"
        " [a.getAttribute('href'), a.rel, a.target])"
    )
    assert links == [["https://example.org/a?b=1", "noopener noreferrer nofollow ugc", "_blank"]]


def test_every_engine_sends_what_was_typed_while_the_server_was_away_once_it_is_back(
    chat_process, open_tab
):
    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    first = chat_process(*ports)
    first.urls()
    tab = open_tab(first.port, "alice")
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(5) == 0
    tab.wait_for(f"() => !({ONLINE})()", what="the status to leave 'online'")
    say_in(tab, "typed while away")
    tab.wait_for(
        "() => document.querySelector('#outbox .state')?.textContent.startsWith('Not sent yet')",
        what="the text marked 'Not sent yet'",
    )
    second = chat_process(*ports)
    second.urls()
    tab.wait_for(ONLINE, timeout=30, what="the page back online")  # its backoff: up to 10 s
    shows(tab, OUTBOX, [])
    shows(tab, OWN_TEXTS, ["typed while away"])
    assert stored_texts(second.port) == ["typed while away"]


@pytest.fixture
def quick_heartbeat(tmp_path, monkeypatch):
    """The page as served, with a heartbeat of 0.5 s instead of 10 s: a dead connection is
    noticed in a second or two, in every engine (Chromium's test above moves a fake clock)."""
    html = chat.PAGE.read_text(encoding="utf-8")
    quick = html.replace("const HEARTBEAT = 10000;", "const HEARTBEAT = 500;")
    assert quick != html, "chat.html no longer says: const HEARTBEAT = 10000;"
    monkeypatch.setattr(chat, "PAGE", tmp_path / "chat.html")
    chat.PAGE.write_text(quick, encoding="utf-8")


def test_every_engine_notices_a_dead_connection_and_sends_what_was_pending_once(
    server, relay, quick_heartbeat, open_tab
):
    tab = open_tab(server.port, "alice")
    tab.evaluate("""() => {
        window.statuses = [];
        new MutationObserver(() => statuses.push(document.getElementById("status").textContent))
            .observe(document.getElementById("status"), {childList: true, subtree: true});
    }""")
    relay.go_silent()  # the connection stays open and carries nothing, either way
    say_in(tab, "through the gap")
    tab.wait_for("() => statuses.includes('reconnecting…')", what="the dead connection noticed")
    tab.wait_for(ONLINE, timeout=30, what="the page back online")
    shows(tab, OWN_TEXTS, ["through the gap"])
    shows(tab, OUTBOX, [])
    assert stored_texts(server.port) == ["through the gap"]


def test_every_engine_keeps_a_busy_room_bounded_and_loads_older_messages(server, open_tab):
    tab = open_tab(server.port, "reader")
    older = "() => !document.getElementById('load-older').hidden"
    assert not tab.evaluate(older)  # nothing older than nothing
    seed(700)
    tab.wait_for(f"() => ({TEXTS})().at(-1) === 'm700'", what="m700 shown")
    shown = len(tab.evaluate(TEXTS))
    assert shown <= 300
    assert tab.evaluate(older)
    tab.evaluate("() => document.getElementById('load-older').click()")
    tab.wait_for(f"(count) => ({TEXTS})().length === count", shown + 100)
    assert tab.evaluate(TEXTS)[0] == f"m{700 - shown - 99}"


PHONE_FITS = """() => {
    const fits = (element) => {
        const box = element.getBoundingClientRect();
        return box.left >= 0 && box.right <= innerWidth && box.bottom <= innerHeight;
    };
    const name = document.querySelector("#chat-box .message:last-child strong");
    return {
        phoneLayout: matchMedia("(max-width: 40rem)").matches,
        scrollsSideways: document.documentElement.scrollWidth > innerWidth,
        outside: [...document.querySelectorAll("header, #chat-form > *:not(label), aside")]
            .filter((element) => !fits(element)).map((element) => element.id || element.localName),
        nameFits: name.getBoundingClientRect().right <= innerWidth,
        onlineListOpen: document.getElementById("online-panel").open,
    };
}"""


def test_every_engine_the_phone_layout_fits(server, open_tab):
    """375 px wide (WebKit: the narrowest its MiniBrowser window allows, about 450 px)."""
    seed(30)
    tab = open_tab(server.port, "W" * 32, viewport=(375, 667))
    shows(tab, f"() => ({TEXTS})().length", 30)
    say_in(tab, "a long word: " + "x" * 200)
    shows(tab, f"() => ({OWN_TEXTS})().length", 1)
    assert tab.viewport()[0] <= 640  # under 40rem: what a phone shows
    assert tab.evaluate(PHONE_FITS) == {
        "phoneLayout": True,
        "scrollsSideways": False,
        "outside": [],
        "nameFits": True,
        "onlineListOpen": False,  # a count that opens on tap
    }


MESSAGE_BOX = """() => {
    const box = document.getElementById("message-input");
    return {height: box.offsetHeight, cut: box.scrollHeight > box.clientHeight};
}"""


def test_every_engine_message_box_grows_with_its_text_and_shrinks_once_sent(server, open_tab):
    """`field-sizing: content` where the engine has it, the page's own script where not."""
    tab = open_tab(server.port, "alice", viewport=(375, 667))
    empty = tab.evaluate(MESSAGE_BOX)
    assert not empty["cut"]  # the placeholder fits: two lines on a phone
    type_into(tab, "one")
    for line in ["two", "three"]:
        tab.press("Shift+Enter")
        tab.type(line)
    three_lines = tab.evaluate(MESSAGE_BOX)
    assert three_lines["height"] > empty["height"] and not three_lines["cut"]
    tab.press("Enter")
    shows(tab, OWN_TEXTS, ["one\ntwo\nthree"])
    shows(tab, MESSAGE_BOX, empty)


def axe_violations(tab):
    """axe-core's violations in the page as it is now (axe-core comes from npm: npm ci)."""
    if not AXE.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("the accessibility tests must run under CI: npm ci")
        pytest.skip("no axe-core: npm ci")
    tab.run_script(AXE.read_text())
    return tab.evaluate("""async () => (await axe.run()).violations.map(
        (v) => [v.id, v.impact, v.nodes.map((node) => node.target)])""")


@pytest.mark.parametrize("state", ["empty room", "busy room", "error", "phone"])
def test_every_engine_page_has_no_accessibility_violations(server, open_tab, state):
    """(The dark scheme is Chromium's test above: Playwright emulates it.)"""
    if state != "empty room":
        seed(50)
    tab = open_tab(server.port, "alice", viewport=(375, 667) if state == "phone" else None)
    if state != "empty room":
        shows(tab, f"() => ({TEXTS})().length", 50)
        say_in(tab, "mine, see https://example.org")
        shows(tab, f"() => ({OWN_TEXTS})()", ["mine, see https://example.org"])
    if state == "error":
        tab.evaluate("""() => {  // one message refused for good, and a text too long
            document.getElementById("message-input").value = "half an emoji \\ud83d";
            document.getElementById("chat-form").requestSubmit();
        }""")
        tab.wait_for("() => document.querySelector('#outbox .message.failed')")
        say_in(tab, "x" * 2001)
        tab.wait_for("() => document.getElementById('chat-error').textContent")
    assert axe_violations(tab) == []


def test_every_engine_screenshot_script_makes_a_desktop_and_a_phone_picture(engine, tmp_path):
    sys.path.insert(0, str(Path(__file__).with_name("docs")))
    from screenshot import make_engine_screenshots

    made = make_engine_screenshots(engine, tmp_path)
    assert [path.name for path in made] == [
        f"screenshot-{engine.name}-desktop.png",
        f"screenshot-{engine.name}-phone.png",
    ]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in made)


# --- The page for a programming workshop (issue 23) ------------------------------------

CODE_MESSAGE = (
    "run `python chat.py --open` first, then:\n"
    "```python\n"
    "def greet(name):\n"
    "    return f'<b>{name}</b>'  # see https://example.org/in-code\n"
    "```\n"
    "docs at https://example.org/docs"
)
CODE_BLOCK = "def greet(name):\n    return f'<b>{name}</b>'  # see https://example.org/in-code"
RTL_NAME = "أحمد"  # Ahmad
RTL_TEXT = "مرحبا بالجميع"  # hello everyone


def test_browser_shows_fenced_code_as_a_block_and_backticks_as_inline_code(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    post(server.port, "/messages", {"name": "presenter", "text": CODE_MESSAGE})
    text = texts(page).last
    expect(text.locator("pre code")).to_have_text(CODE_BLOCK)  # indentation kept, no fences
    inline = page.locator("#chat-box .message .text > code")
    expect(inline).to_have_text("python chat.py --open")
    assert "```" not in text.text_content() and "`" not in text.text_content()
    for code in (text.locator("pre"), inline):
        assert "monospace" in code.evaluate("e => getComputedStyle(e).fontFamily")
    assert text.locator("pre").evaluate("e => getComputedStyle(e).whiteSpace") == "pre"
    expect(text.locator("b, script, img")).to_have_count(0)  # code stays text
    expect(text.locator("code a")).to_have_count(0)  # an address inside code is not a link
    expect(text.locator("a")).to_have_attribute("href", "https://example.org/docs")


def test_browser_text_without_a_closing_fence_stays_as_typed(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    post(server.port, "/messages", {"text": "``` not closed, and ``"})
    expect(texts(page)).to_have_text(["``` not closed, and ``"])
    expect(texts(page).locator("code")).to_have_count(0)


def test_browser_a_code_block_scrolls_sideways_on_a_phone_and_the_page_does_not(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice", **PHONE)
    long_line = "    " + "x = 1; " * 40
    post(server.port, "/messages", {"text": f"```\n{long_line}\n```"})
    pre = texts(page).last.locator("pre")
    expect(pre).to_have_text(long_line)
    assert pre.evaluate("pre => pre.scrollWidth > pre.clientWidth")  # it scrolls, not wraps
    assert pre.bounding_box()["height"] < 60  # one line
    assert page.locator("#log").evaluate("log => log.scrollWidth <= log.clientWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_browser_copy_puts_the_code_on_the_clipboard(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice", permissions=["clipboard-read", "clipboard-write"])
    post(server.port, "/messages", {"text": CODE_MESSAGE})
    copy = texts(page).last.get_by_role("button")  # "Copy", then what it did
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == CODE_BLOCK


def test_browser_without_the_clipboard_api_copy_selects_the_code(server, open_page):
    """Plain http on a LAN address has no navigator.clipboard (secure contexts only)."""
    from playwright.sync_api import expect

    def no_clipboard_api(context):
        context.add_init_script(
            "Object.defineProperty(Navigator.prototype, 'clipboard', {get: () => undefined})"
        )

    page = open_page(server.port, "alice", prepare=no_clipboard_api)
    post(server.port, "/messages", {"text": CODE_MESSAGE})
    copy = texts(page).last.get_by_role("button")  # "Copy", then what it did
    copy.click()
    expect(copy).to_have_text("Selected: copy it")
    assert page.evaluate("getSelection().toString()") == CODE_BLOCK


def test_browser_a_right_to_left_name_keeps_the_header_in_order_and_rtl_text_reads_right(
    server, open_page
):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    post(server.port, "/messages", {"name": RTL_NAME, "text": RTL_TEXT})
    message = page.locator("#chat-box .message").last
    expect(message.locator("strong bdi")).to_have_text(RTL_NAME)
    name, time_ = message.locator("strong").bounding_box(), message.locator("time").bounding_box()
    assert name["x"] + name["width"] <= time_["x"]  # the name, then the time: not split
    text = message.locator(".text")
    assert text.evaluate("e => getComputedStyle(e).direction") == "rtl"
    # the text sits on the right of its bubble, where right-to-left reading begins
    right_edges = text.evaluate("""e => {
        const range = document.createRange();
        range.selectNodeContents(e);
        return [range.getBoundingClientRect().right, e.getBoundingClientRect().right];
    }""")
    assert abs(right_edges[0] - right_edges[1]) < 2, right_edges


def test_browser_names_in_notices_and_the_online_list_are_isolated(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    with joined(server, name=RTL_NAME):
        expect(page.locator("#chat-box .notice").last).to_have_text(f"{RTL_NAME} joined")
        expect(page.locator("#chat-box .notice bdi").last).to_have_text(RTL_NAME)
        expect(page.locator("#online li bdi")).to_have_text(["alice", RTL_NAME])


def test_browser_the_name_box_takes_32_characters_even_of_emoji(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    with joined(server, name="watcher") as (watcher, _):
        receive(watcher, "presence")  # its own join
        page.fill("#name-input", "😀" * 40)  # 80 UTF-16 units; maxlength would stop at 16 emoji
        expect(page.locator("#name-input")).to_have_value("😀" * 32)
        expect(page.locator("#chat-error")).to_have_text("A name has at most 32 characters.")
        page.press("#name-input", "Enter")
        change = presence_frames(watcher, 1)[0]["changes"][0]
        assert change == {"renamed": {"from": "alice", "to": "😀" * 32}}


def scripted_room():
    """`prepare` for open_page: the page's websocket goes to the test, which plays the server
    (for frames the server in this branch does not send yet, or in an order it cannot be made
    to send them). Returns (prepare, sockets)."""
    sockets = []

    def prepare(context):
        context.route_web_socket("**/*", lambda ws: sockets.append(ws))

    return prepare, sockets


def scripted_history(ws, name, online):
    history = {"type": "history", "room": "r", "name": name, "messages": [], "more": False}
    ws.send(json.dumps({**history, "online": online}))


def test_browser_a_refused_rename_puts_the_room_s_name_back_in_the_box_with_the_reason(
    server, open_page
):
    """The error frame agreed with the server side of issue 23: its `name` is the name the room
    still knows, its text begins "rename refused: "."""
    from playwright.sync_api import expect

    prepare, sockets = scripted_room()
    page = open_page(server.port, "n20", prepare=prepare, online=False)
    wait_in_page(page, lambda: sockets, timeout=5)
    scripted_history(sockets[0], "n20", ["n20", "n24"])
    expect(page.locator("#status")).to_have_text("online")
    asked = []
    sockets[0].on_message(lambda frame: asked.append(json.loads(frame)))
    page.fill("#name-input", "n24")
    page.press("#name-input", "Enter")
    wait_in_page(page, lambda: asked, timeout=5)
    assert asked == [{"type": "name", "name": "n24"}]
    refusal = "rename refused: n24 is the name of someone else here"
    sockets[0].send(json.dumps({"type": "error", "error": refusal, "name": "n20"}))
    expect(page.locator("#name-input")).to_have_value("n20")
    expect(page.locator("#chat-error")).to_have_text(refusal)
    assert page.evaluate("localStorage.getItem('chat-name')") == "n20"
    expect(page.locator("#online .self")).to_have_text("n20 (you)")


def name_frames(page):
    frames = [json.loads(frame) for frame in page.sent_frames]
    return [frame for frame in frames if isinstance(frame, dict) and frame.get("type") == "name"]


def test_browser_a_rename_to_the_same_name_sends_nothing(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    page.fill("#name-input", " alice ")
    page.press("#name-input", "Enter")
    page.press("#name-input", "Tab")
    page.fill("#name-input", "alicia")
    page.press("#name-input", "Tab")
    wait_in_page(page, lambda: name_frames(page))
    assert name_frames(page) == [{"type": "name", "name": "alicia"}]
    expect(page.locator("#chat-box .notice", has_text="is now")).to_have_text(
        ["alice is now alicia"]
    )


def test_browser_the_online_list_marks_oneself_among_people_of_the_same_name(server, open_page):
    from playwright.sync_api import expect

    first, second = open_page(server.port, "sam"), open_page(server.port, "sam")
    bob = open_page(server.port, "bob")
    for page in (first, second):
        expect(page.locator("#online li")).to_have_text(["bob", "sam (you)", "sam"])
    expect(bob.locator("#online li")).to_have_text(["bob (you)", "sam", "sam"])
    expect(bob.locator("#online .self")).to_have_count(1)


def test_browser_a_first_time_visitor_is_heard_of_once_under_the_chosen_name(server, open_page):
    from playwright.sync_api import expect

    with joined(server, name="watcher") as (watcher, _):
        receive(watcher, "presence")  # its own join
        page = open_page(server.port, online=False)  # nothing kept: a first-time visitor
        name_box = page.locator("#name-input")
        expect(name_box).to_be_focused()
        expect(name_box).to_have_value(re.compile(r"^guest-\d+$"))  # a suggestion
        expect(page.get_by_role("button", name="Join")).to_be_visible()
        expect(page.locator("#status")).to_have_text("not in the chat yet")
        assert get(server.port, "/health")[1]["clients"] == 1  # not joined: only the watcher

        name_box.fill("alice")
        name_box.press("Enter")
        expect(page.locator("#status")).to_have_text("online")
        expect(page.locator("#message-input")).to_be_focused()
        say(page, "hello")
        frames = receive_until(
            watcher,
            lambda frames: frames and frames[-1]["type"] == "message",
            ("presence", "message"),
        )
        assert all_changes(frames[:-1]) == [{"joined": "alice"}]
        assert frames[-1]["name"] == "alice"
        assert page.evaluate("localStorage.getItem('chat-name')") == "alice"


def test_browser_a_first_time_visitor_may_join_with_the_button_and_a_message(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, online=False)
    page.fill("#message-input", "hello from a newcomer")
    page.get_by_role("button", name="Join").click()
    expect(texts(page)).to_have_text(["hello from a newcomer"])
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    assert stored_texts(server.port) == ["hello from a newcomer"]


@pytest.mark.parametrize(
    "changes, summary",
    [
        (
            [{"joined": "a"}, {"joined": "b"}, {"joined": "c"}, {"left": "d"}]
            + [{"renamed": {"from": "e", "to": "f"}}, {"renamed": {"from": "g", "to": "h"}}],
            "3 joined, 1 left, 2 renamed",
        ),
        ([{"renamed": {"from": f"n{n}", "to": f"m{n}"}} for n in range(4)], "4 renamed"),
    ],
)
def test_browser_a_summary_of_many_changes_counts_renames_and_leaves_out_zeros(
    server, open_page, changes, summary
):
    from playwright.sync_api import expect

    prepare, sockets = scripted_room()
    page = open_page(server.port, "alice", prepare=prepare, online=False)
    wait_in_page(page, lambda: sockets, timeout=5)
    scripted_history(sockets[0], "alice", ["alice", "d", "e", "g", "n0", "n1", "n2", "n3"])
    expect(page.locator("#status")).to_have_text("online")
    sockets[0].send(json.dumps({"type": "presence", "changes": changes}))
    expect(page.locator("#chat-box .notice")).to_have_text([summary])


def test_browser_notices_with_long_names_wrap_on_a_360_pixel_phone(server, open_page):
    from playwright.sync_api import expect

    long_name = "W" * 32
    page = open_page(server.port, "alice", **{**PHONE, "viewport": {"width": 360, "height": 640}})
    with joined(server, name=long_name) as (ws, _):
        expect(page.locator("#chat-box .notice").last).to_contain_text(f"{long_name} joined")
        ws.send(json.dumps({"type": "name", "name": "V" * 32}))  # a join and a rename: one notice
        expect(page.locator("#chat-box .notice").last).to_contain_text("is now")
    for notice in page.locator("#chat-box .notice").all():
        box = notice.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 360
    assert page.locator("#log").evaluate("log => log.scrollWidth <= log.clientWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360


@pytest.mark.parametrize("lost", ["both ways", "answers only"])
def test_browser_a_reload_keeps_what_was_typed_and_sends_what_was_pending_once(
    server, relay, open_page, lost
):
    """The relay goes silent with a message on its way: either it never reached the server or
    only the answer is lost. The reader reloads; the typed text is back in the box and the
    message is stored once, with its ref."""
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    relay.go_silent(to_server=lost == "both ways")
    say(page, "on its way")
    expect(page.locator("#outbox .state")).to_have_text("Sending…")
    if lost == "answers only":
        wait_for_health(server.port, messages=1)
    page.fill("#message-input", "half a thought")
    page.reload()
    expect(page.locator("#message-input")).to_have_value("half a thought")
    expect(page.locator("#status")).to_have_text("online")
    expect(texts(page)).to_have_text(["on its way"])
    expect(page.locator("#chat-box .message.own")).to_have_count(1)  # still known as one's own
    expect(page.locator("#outbox .message")).to_have_count(0)
    assert stored_texts(server.port) == ["on its way"]


def test_browser_offline_shows_a_banner_and_marks_the_online_list_out_of_date(server, open_page):
    from playwright.sync_api import expect

    def form_is_below_the_log():
        log, form = page.locator("#log").bounding_box(), page.locator("#chat-form").bounding_box()
        return form["y"] >= log["y"] + log["height"] - 1

    page = open_page(server.port, "alice")
    banner = page.locator("#offline")
    expect(banner).to_be_hidden()
    assert form_is_below_the_log()
    page.context.set_offline(True)
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("Not connected")
    assert banner.bounding_box()["y"] < page.locator("#log").bounding_box()["y"]
    assert form_is_below_the_log()
    expect(page.locator("#online-count")).to_have_text("1 online (out of date: not connected)")
    page.context.set_offline(False)
    expect(page.locator("#status")).to_have_text("online")
    expect(banner).to_be_hidden()
    expect(page.locator("#online-count")).to_have_text("1 online")


@pytest.mark.parametrize(
    "device, keys",
    [
        ("desktop", "Enter sends, Shift+Enter adds a line"),
        ("touch", "Enter adds a line, the Send button sends"),
    ],
)
def test_browser_the_placeholder_says_what_the_keys_do_on_this_device(
    server, open_page, device, keys
):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice", **(PHONE if device == "touch" else {}))
    placeholder = f"Write a message: {keys}"
    expect(page.locator("#message-input")).to_have_attribute("placeholder", placeholder)


def test_browser_on_a_touch_keyboard_enter_adds_a_line_and_send_sends(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice", **PHONE)
    box = page.locator("#message-input")
    box.tap()
    page.keyboard.type("line one")
    page.keyboard.press("Enter")
    page.keyboard.type("line two")
    expect(box).to_have_value("line one\nline two")
    assert sent_texts(page) == []
    page.get_by_role("button", name="Send").tap()
    expect(texts(page)).to_have_text(["line one\nline two"])
    expect(box).to_be_focused()  # the keyboard stays for the next message


def test_browser_new_messages_button_leaves_the_focus_in_the_conversation(server, open_page):
    from playwright.sync_api import expect

    seed(50)
    page = open_page(server.port, "alice")
    expect(texts(page)).to_have_count(50)
    page.locator("#log").evaluate("log => log.scrollTop = 0")
    post(server.port, "/messages", {"text": "while you read"})
    button = page.get_by_role("button", name="New messages")
    button.focus()
    page.keyboard.press("Enter")
    expect(button).to_be_hidden()
    expect(texts(page).last).to_be_in_viewport()
    expect(page.locator("#log")).to_be_focused()


def test_browser_load_older_messages_leaves_the_focus_in_the_conversation(server, open_page):
    from playwright.sync_api import expect

    seed(120)  # 50 shown, 70 older: one load fetches them all and the button goes
    page = open_page(server.port, "alice")
    expect(texts(page)).to_have_count(50)
    older = page.get_by_role("button", name="Load older messages")
    older.focus()
    page.keyboard.press("Enter")
    expect(texts(page)).to_have_count(120)
    expect(older).to_be_hidden()
    expect(page.locator("#log")).to_be_focused()


# --- Found by the review (page) ----------------------------------------------------------
# Where the merged branches meet in chat.html: the room key's locked-out page and the offline
# banner and reload keeping (#19, #23), the grow fallback and a restored draft (#21, #23), ...


def test_browser_locked_out_the_banner_says_to_open_the_new_link_and_then_what_waits_goes(
    chat_process, open_page
):
    """The banner said "trying again, what you send goes when the chat is back": it never
    tries again. Opening the new link in the same tab brings the waiting message and the draft."""
    from playwright.sync_api import expect

    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    first = chat_process(*ports, "--key", ROOM_KEY)
    first.urls()
    page = open_page(url=f"http://127.0.0.1:{first.port}/?key={ROOM_KEY}", name="alice")
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(5) == 0
    say(page, "typed while it was away")
    page.fill("#message-input", "half a thought")
    second = chat_process(*ports, "--key", ROOM_KEY[::-1])
    second.urls()
    expect(page.locator("#status")).to_have_text("locked out: open the link the chat printed")
    banner = page.locator("#offline")
    expect(banner).to_contain_text("Locked out")
    expect(banner).not_to_contain_text("trying again")
    page.goto(f"http://127.0.0.1:{second.port}/?key={ROOM_KEY[::-1]}")
    expect(page.locator("#status")).to_have_text("online")
    expect(texts(page)).to_have_text(["typed while it was away"])
    expect(page.locator("#message-input")).to_have_value("half a thought")
    expect(banner).to_be_hidden()


def test_every_engine_a_draft_kept_over_a_reload_shows_whole_in_the_message_box(server, open_tab):
    """Where the engine lacks `field-sizing` (the page grows the box itself), the restored
    draft sat in a one-line box: its other lines were hidden until the next key."""
    tab = open_tab(server.port, "alice", viewport=(375, 667))
    empty = tab.evaluate(MESSAGE_BOX)
    type_into(tab, "one")
    for line in ["two", "three"]:
        tab.press("Shift+Enter")
        tab.type(line)
    tab.goto(f"http://127.0.0.1:{server.port}/")
    tab.wait_for(ONLINE, what="the status 'online'")
    shows(tab, "() => document.getElementById('message-input').value", "one\ntwo\nthree")
    restored = tab.evaluate(MESSAGE_BOX)
    assert restored["height"] > empty["height"] and not restored["cut"]


def test_browser_right_to_left_text_and_names_read_right_while_typed_too(server, open_page):
    """The message shows "مرحبا!" with the "!" at its left end (dir="auto"); the box it was
    typed in put it at the right end, and the name box did the same with an Arabic name."""
    page = open_page(server.port, "alice")
    page.fill("#message-input", "مرحبا!")
    page.fill("#name-input", "سارة")
    for box in ["#message-input", "#name-input"]:
        assert page.locator(box).evaluate("box => box.matches(':dir(rtl)')"), box
    page.fill("#message-input", "hello")
    assert page.locator("#message-input").evaluate("box => box.matches(':dir(ltr)')")


def test_browser_a_reconnect_while_a_new_name_is_being_typed_keeps_both_names_apart(
    server, open_page
):
    """The page reconnected under whatever was in the name box (the room heard "ali joined"
    from a half-typed name) and then wrote the room's answer over what was being typed."""
    from playwright.sync_api import expect

    alice = open_page(server.port, "alice")
    bob = open_page(server.port, "bob")
    alice.press("#name-input", "End")
    alice.keyboard.type("-typing")  # not taken yet: no Enter
    alice.context.set_offline(True)
    expect(alice.locator("#offline")).to_be_visible()
    alice.context.set_offline(False)
    expect(alice.locator("#status")).to_have_text("online")
    expect(alice.locator("#name-input")).to_be_focused()
    expect(alice.locator("#name-input")).to_have_value("alice-typing")
    expect(bob.locator("#online li")).to_have_text(["alice", "bob (you)"])
    alice.press("#name-input", "Enter")
    expect(bob.locator("#online li")).to_have_text(["alice-typing", "bob (you)"])


def test_browser_online_a_message_the_chat_asks_to_wait_does_not_say_when_the_chat_is_back(
    server, open_page, monkeypatch
):
    """Past the burst, with the status "online" and no banner, every message waiting said
    "it goes as soon as the chat is back"."""
    from playwright.sync_api import expect

    monkeypatch.setattr(chat, "BURST", 3)  # most of the 30 wait for the limit
    page = open_page(server.port, "alice")
    page.evaluate("""() => {
        const form = document.getElementById("chat-form");
        for (let n = 0; n < 30; n++) {
            document.getElementById("message-input").value = "burst " + n;
            form.requestSubmit();
        }
    }""")
    expect(page.locator("#outbox .message.later .state")).to_have_text(
        "Not sent yet: the chat asked to wait a moment; it goes again by itself."
    )
    expect(page.locator("#outbox")).not_to_contain_text("when the chat is back")
    expect(page.locator("#outbox")).not_to_contain_text("as soon as the chat is back")
    expect(texts(page)).to_have_text([f"burst {n}" for n in range(30)], timeout=20_000)


# --- Found by the review (server) -----------------------------------------------------
# Where the merged features meet: the room key beside other cookies and headers sent twice,
# start-up flags, and retry_after on every failure that passes.


@pytest.mark.parametrize("other", ["theme=dark mode", 'prefs={"a":1}', "flag", 'q="open'])
def test_another_cookie_of_the_host_does_not_hide_the_room_key(keyed_server, other):
    # Cookies are per host, not per port: other pages on localhost or the LAN address set
    # theirs, and http.cookies stopped reading at the first one it could not parse.
    cookie = {"Cookie": f"{other}; {chat.policy.cookie_name()}={ROOM_KEY}"}
    assert request(keyed_server.port, "GET", "/config", headers=cookie).status == 200
    with connect(ws_url(keyed_server), open_timeout=5, additional_headers=cookie) as ws:
        assert receive(ws, "history")["type"] == "history"


def test_a_bearer_key_in_an_authorization_sent_twice_gets_in_over_http_as_on_the_handshake(
    keyed_server,
):
    # waitress joins a header sent twice with ", "; the handshake keeps both
    headers = [
        ("Host", "127.0.0.1"),
        ("Authorization", "Bearer not-the-key-0123456789"),
        ("Authorization", f"Bearer {ROOM_KEY}"),
    ]
    assert raw_handshake(keyed_server.ws_port, headers)[0] == 101
    assert raw_request(keyed_server.port, "GET", "/config", headers)[0] == 200


@pytest.mark.parametrize("url", ["localhost:6379", "redis://[::1", "redis://127.0.0.1:99999/0"])
def test_a_redis_url_that_is_no_redis_url_is_one_line_and_exit_2(chat_process, url):
    pytest.importorskip("redis")
    process = chat_process("--port", "0", "--ws-port", "0", "--redis", url)
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and "is not a Redis URL" in error and "Traceback" not in error


def test_an_empty_store_file_name_is_one_line_and_exit_2(chat_process):
    process = chat_process("--port", "0", "--ws-port", "0", "--store", "")
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and error.startswith("chat.py: error: argument --store")


def test_a_rename_refused_for_going_too_fast_says_retry_after_and_a_bad_name_does_not(server):
    with joined(server, name="n0") as (ws, _):
        rename(ws, "\u202eevil")
        bad = receive(ws, "error")
        for n in range(1, 41):  # twice the burst, at once
            rename(ws, f"n{n}")
        too_fast = receive(ws, "error")
    assert "retry_after" not in bad
    assert too_fast["error"].startswith("rename refused: too many")
    assert 0 < too_fast["retry_after"] <= 1 / PER_SECOND


def test_a_full_room_says_retry_after_on_the_handshake(monkeypatch):
    monkeypatch.setattr(chat, "MAX_CLIENTS", 1)
    with (
        running_servers() as servers,
        joined(servers),
        pytest.raises(websockets.exceptions.InvalidStatus) as refused,
        connect(ws_url(servers), open_timeout=5),
    ):
        pass
    assert refused.value.response.status_code == 503
    assert refused.value.response.headers["Retry-After"] == "1"


def test_a_degraded_health_says_retry_after_as_every_other_503(server, monkeypatch):
    async def degraded():  # what the Redis room answers while Redis is away
        return {"status": "degraded", "clients": 0, "messages": 0, "last_id": 0}

    monkeypatch.setattr(server.room, "health", degraded)
    answer = request(server.port, "GET", "/health")
    assert answer.status == 503 and answer.headers["Retry-After"] == "1"


def test_stop_does_not_wait_for_a_client_that_stopped_reading_its_history():
    threads_before = set(threading.enumerate())
    servers = chat.Servers("127.0.0.1", 0, 0, history=2000)
    stopped = False
    try:
        seed_big(2000)
        with stalled_resume(servers):  # its close frame would wait behind a piece it never reads
            began = time.monotonic()
            servers.stop()  # gave up at 6 s with RoomUnavailable; SIGTERM then hung with --store
            stopped = True
            assert time.monotonic() - began < 5
    finally:
        if not stopped:
            servers.stop()
    assert not threads_started_since(threads_before), "a server thread outlived stop()"


# --- A programming workshop, server side: names belong to people, presence reads right,
# a restart keeps the room (issue 23) -----------------------------------------------------


def rename(ws, name):
    ws.send(json.dumps({"type": "name", "name": name}))


def test_a_name_held_online_at_another_address_is_refused_on_join_naming_it(server):
    with (
        joined(server, "127.0.0.1", name="bob"),
        joined(server, "127.0.0.2", name="Bob") as (ws, history),
    ):
        assert history["name"].startswith("guest-")
        assert "'Bob' is taken" in receive(ws, "error")["error"]


def test_one_address_may_share_a_name_between_its_tabs(server):
    with (
        joined(server, "127.0.0.3", name="bob"),
        joined(server, "127.0.0.3", name="bob") as (ws, history),
    ):
        assert history["name"] == "bob"
        ws.send("hi")
        assert receive(ws, "message")["name"] == "bob"


def test_a_rename_to_a_name_held_at_another_address_is_refused_with_the_name_kept(server):
    with (
        joined(server, "127.0.0.1", name="bob"),
        joined(server, "127.0.0.2", name="carol") as (ws, _),
    ):
        rename(ws, "BOB")
        error = receive(ws, "error")
        assert error["error"].startswith("rename refused: ") and "'BOB' is taken" in error["error"]
        assert error["name"] == "carol"
        ws.send("still carol")
        assert receive(ws, "message")["name"] == "carol"


def test_a_name_is_free_again_once_its_holder_left(server):
    with joined(server, "127.0.0.1", name="bob"):
        pass
    wait_for_health(server.port, clients=0)  # the server has seen bob go, not only bob's close
    with joined(server, "127.0.0.2", name="bob") as (_, history):
        assert history["name"] == "bob"


def test_an_http_post_under_a_name_held_online_at_another_address_is_a_409(server):
    with joined(server, "127.0.0.2", name="bob"):
        status, body = post(server.port, "/messages", {"name": "bob", "text": "hi"})
        assert status == 409 and "'bob' is taken" in body["errors"]["name"]
        assert (
            post(server.port, "/messages", {"name": "bob", "text": "me"}, source="127.0.0.2")[0]
            == 201
        )
    assert stored_texts(server.port) == ["me"]


def test_a_name_is_held_from_the_handshake_while_its_history_still_comes(big_room):
    sock = socket.socket()  # bob resumes 16 MB of history, and reads none of it yet
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", big_room.ws_port))
    url = ws_url(big_room, name="bob", since=0)
    with connect(url, sock=sock, open_timeout=5, close_timeout=1, max_queue=1):
        wait_until(lambda: server_waits_for_a_client(big_room), what="bob's history waiting")
        with joined(big_room, "127.0.0.2", name="bob") as (ws, history):
            assert history["name"].startswith("guest-")
            assert "'bob' is taken" in receive(ws, "error")["error"]


def test_a_refused_rename_for_going_too_fast_says_so_and_keeps_the_name(server):
    with joined(server, name="n0") as (ws, _):
        for n in range(1, 41):  # twice the burst, at once
            rename(ws, f"n{n}")
        error = receive(ws, "error")
    assert error["error"] == "rename refused: too many messages too fast: wait a second"
    assert error["name"] == "n20"  # the burst of 20 went through, and the room knows the last


@pytest.mark.parametrize(
    "name, rule",
    [
        ("\u202eevil", "format character (U+202E"),  # right-to-left override
        ("ali\u2066ce", "format character (U+2066"),  # a bidi isolate
        ("\u200b", "format character (U+200B"),  # zero width space
        ("\u200dbob", "format character (U+200D"),  # a joiner outside a word
        ("bob\u3164", "format character (U+3164"),  # a Hangul filler: "bob" to the eye
        (" \u0301\u0302 ", "name shows nothing"),  # marks with no letter
        ("x" + "\u0301\u0302\u0303\u0304\u0305", "more than 3 combining marks in a row"),
        ("a" + "\u0300" * 31, "more than 3 combining marks in a row"),
        ("bo\u2028b", "control characters"),  # a line separator
    ],
)
def test_names_that_garble_or_hide_are_refused_naming_the_rule(server, name, rule):
    status, body = post(server.port, "/messages", {"name": name, "text": "hi"})
    assert status == 400 and rule in body["errors"]["name"]
    with joined(server, name="kept") as (ws, _):
        rename(ws, name)
        error = receive(ws, "error")
        assert error["error"].startswith("rename refused: ") and rule in error["error"]
        assert error["name"] == "kept"
    with joined(server, name=name) as (ws, history):
        assert history["name"].startswith("guest-") and rule in receive(ws, "error")["error"]


@pytest.mark.parametrize(
    "name",
    [
        "Nguye\u0302\u0303n",  # Vietnamese, typed as marks: stored composed (NFC), "Nguyễn"
        "أحمد",
        "می\u200cخواهم",  # Persian: a zero width non-joiner inside the word
        "👩\u200d💻",  # an emoji sequence: a zero width joiner between two emoji
        "🏳\ufe0f\u200d🌈",
        "שָּׁלוֹם",  # pointed Hebrew: three marks on one letter
        "1\ufe0f\u20e3",  # a keycap emoji: two marks
    ],
)
def test_names_of_real_writing_and_emoji_are_accepted(server, name):
    status, message = post(server.port, "/messages", {"name": name, "text": "hi"})
    assert status == 201 and message["name"] == unicodedata.normalize("NFC", name)


@pytest.fixture
def slow_presence(server, monkeypatch):
    """An interval of an hour, which the test ends itself (send_presence_now): what happens in
    one interval does not depend on the machine's speed."""
    monkeypatch.setattr(chat, "PRESENCE_EVERY", 3600)
    return server


def send_presence_now(servers):
    """The end of the interval: the changes waiting go out."""
    servers.loop.call_soon_threadsafe(chat.room.send_presence)


def synced(ws):
    """Returns once the server has acted on every frame this client sent before (in order)."""
    ws.send(json.dumps({"type": "ping"}))
    receive(ws, "pong")


@contextlib.contextmanager
def watching(servers):
    """A client whose own join (and any before it) has gone out: a new interval begins."""
    with joined(servers, name="watcher") as (watcher, _):
        send_presence_now(servers)
        presence_changes(watcher, until=lambda changes: {"joined": "watcher"} in changes)
        yield watcher


def changes_until_joined(watcher, name):
    return presence_changes(watcher, until=lambda changes: {"joined": name} in changes)


def test_a_join_then_a_rename_in_one_interval_is_one_join_under_the_new_name(slow_presence):
    with watching(slow_presence) as watcher, joined(slow_presence) as (newcomer, _):
        rename(newcomer, "alice")
        synced(newcomer)
        send_presence_now(slow_presence)
        frame = receive(watcher, "presence")
    assert frame == {"type": "presence", "joined": "alice", "changes": [{"joined": "alice"}]}


def test_a_join_then_a_leave_in_one_interval_is_nothing(slow_presence):
    with watching(slow_presence) as watcher:
        with joined(slow_presence, name="ghost"):
            pass
        wait_for_health(slow_presence.port, clients=1)  # the ghost has gone
        send_presence_now(slow_presence)
        with joined(slow_presence, name="marker"):
            send_presence_now(slow_presence)
            assert receive(watcher, "presence")["changes"] == [{"joined": "marker"}]


def test_renames_in_one_interval_are_one_rename(slow_presence):
    with joined(slow_presence, name="a") as (a, _), watching(slow_presence) as watcher:
        for n in range(1, BURST):  # as many as one client may: the others hear of one
            rename(a, f"a{n}")
        synced(a)
        send_presence_now(slow_presence)
        frame = receive(watcher, "presence")
    assert frame["changes"] == [{"renamed": {"from": "a", "to": f"a{BURST - 1}"}}]


def test_a_rename_then_a_leave_in_one_interval_is_a_leave_under_the_old_name(slow_presence):
    with joined(slow_presence, name="a") as (a, _), watching(slow_presence) as watcher:
        rename(a, "b")
        synced(a)
        a.close()
        wait_for_health(slow_presence.port, clients=1)
        send_presence_now(slow_presence)
        frame = receive(watcher, "presence")
    assert frame["changes"] == [{"left": "a"}]


def test_a_rename_to_the_same_name_is_no_change(server):
    with joined(server, name="a") as (a, _), watching(server) as watcher:
        rename(a, "a")
        with joined(server, name="marker"):
            assert changes_until_joined(watcher, "marker") == [{"joined": "marker"}]


def test_online_in_history_stays_exact_while_changes_are_coalesced(slow_presence):
    with watching(slow_presence) as watcher, joined(slow_presence) as (newcomer, _):
        rename(newcomer, "alice")
        synced(newcomer)
        with joined(slow_presence, name="late") as (late, history):
            send_presence_now(slow_presence)
            changes = changes_until_joined(late, "late")
            assert changes_until_joined(watcher, "late") == changes
    assert changes == [{"joined": "alice"}, {"joined": "late"}]
    assert sorted(history["online"] + [change["joined"] for change in changes]) == [
        "alice",
        "late",
        "watcher",
    ]


def test_waitress_task_queue_warnings_come_once_per_interval_not_per_request(
    server, caplog, monkeypatch
):
    monkeypatch.setattr(chat.ONCE_PER_INTERVAL, "last_logged", {})  # as if nothing logged yet
    busy = threading.Event()
    server.loop.call_soon_threadsafe(busy.wait, 10)  # the loop is busy: requests wait for it
    with concurrent.futures.ThreadPoolExecutor(12) as clients:
        answers = [clients.submit(request, server.port, "GET", "/health") for _ in range(12)]
        queue = server.http_server.task_dispatcher.queue
        wait_until(lambda: len(queue) >= 6, what="requests queued for waitress's threads")
        busy.set()
        assert [answer.result().status for answer in answers] == [200] * 12
    warnings = [r for r in caplog.records if r.getMessage().startswith("Task queue depth is")]
    assert len(warnings) == 1


def started(chat_process, *args):
    process = chat_process("--port", "0", "--ws-port", "0", *args)
    process.urls()
    return process


def crash(process):
    """kill -9: nothing is flushed, closed or said goodbye to."""
    process.process.kill()
    process.process.wait(5)


def test_store_keeps_ids_room_messages_and_refs_over_a_crash_and_restart(chat_process, tmp_path):
    store = str(tmp_path / "room.db")
    before = started(chat_process, "--store", store)
    room_id = get(before.port, "/config")[1]["room"]
    stored = [post(before.port, "/messages", {"text": f"m{n}", "ref": f"r{n}"})[1] for n in (1, 2)]
    with connect(f"ws://127.0.0.1:{before.ws_port}/?name=ann", open_timeout=5) as ws:
        receive(ws, "history")
        ws.send(json.dumps({"type": "message", "text": "from ann", "ref": "w1"}))
        stored.append(receive(ws, "message"))
    crash(before)  # each message was acknowledged (201, or its frame): it is on disk
    after = started(chat_process, "--store", store)
    assert get(after.port, "/config")[1]["room"] == room_id
    assert get(after.port, "/messages")[1]["messages"] == stored
    assert post(after.port, "/messages", {"text": "m2", "ref": "r2"}) == (200, stored[1])
    assert post(after.port, "/messages", {"text": "m4"})[1]["id"] == 4


def test_a_client_resuming_over_a_restart_misses_nothing_and_gets_nothing_twice(
    chat_process, tmp_path
):
    store = str(tmp_path / "room.db")
    before = started(chat_process, "--store", store)
    for n in (1, 2):
        post(before.port, "/messages", {"text": f"m{n}"})
    with connect(f"ws://127.0.0.1:{before.ws_port}/", open_timeout=5) as ws:
        history = receive(ws, "history")
    seen, room_id = history["messages"][-1]["id"], history["room"]
    for n in (3, 4):  # while the client is away
        post(before.port, "/messages", {"text": f"m{n}"})
    crash(before)
    after = started(chat_process, "--store", store)
    post(after.port, "/messages", {"text": "m5"})
    url = f"ws://127.0.0.1:{after.ws_port}/?since={seen}&room={room_id}"
    with connect(url, open_timeout=5, max_queue=None) as ws:
        history = receive_history(ws)
        post(after.port, "/messages", {"text": "m6"})
        live = receive(ws, "message")
    assert [(m["id"], m["text"]) for m in history["messages"] + [live]] == [
        (3, "m3"),
        (4, "m4"),
        (5, "m5"),
        (6, "m6"),
    ]


def test_a_restart_keeps_the_newest_history_messages(chat_process, tmp_path):
    store = str(tmp_path / "room.db")
    before = started(chat_process, "--store", store, "--history", "3")
    for n in range(1, 6):
        post(before.port, "/messages", {"text": f"m{n}"})
    crash(before)
    after = started(chat_process, "--store", store, "--history", "3")
    assert stored_texts(after.port) == ["m3", "m4", "m5"]
    assert post(after.port, "/messages", {"text": "m6"})[1]["id"] == 6


def test_the_store_file_is_bounded_by_history(tmp_path):
    with running_servers(history=3, store=str(tmp_path / "room.db")):
        seed(250)
    with contextlib.closing(sqlite3.connect(tmp_path / "room.db")) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM messages ORDER BY id")]
    assert ids[-3:] == [248, 249, 250] and len(ids) <= 3 + chat.HistoryFile.TRIM_EVERY


def test_guest_numbers_go_on_over_a_restart(chat_process, tmp_path):
    store = str(tmp_path / "room.db")
    before = started(chat_process, "--store", store)
    assert post(before.port, "/messages", {"text": "hi"})[1]["name"] == "guest-1"
    crash(before)
    after = started(chat_process, "--store", store)
    assert post(after.port, "/messages", {"text": "hi"})[1]["name"] == "guest-2"


@pytest.mark.parametrize(
    "setup, args, error",
    [
        (None, ["--redis", "redis://127.0.0.1:9/0"], "--store and --redis do not go together"),
        ("in use", [], "is in use (is another chat.py running with it?)"),
        ("not a database", [], "file is not a database"),
    ],
)
def test_a_store_the_chat_cannot_use_is_one_line_and_exit_2(
    chat_process, tmp_path, setup, args, error
):
    store = tmp_path / "room.db"
    if setup == "in use":
        started(chat_process, "--store", str(store))
    elif setup == "not a database":
        store.write_text("my notes, not a database\n" * 100)
    process = chat_process("--port", "0", "--ws-port", "0", "--store", str(store), *args)
    assert process.process.wait(15) == 2
    message = process.process.stderr.read()
    assert message.count("\n") == 1 and message.startswith("chat.py: error: ") and error in message


def test_concurrent_senders_give_everyone_the_same_order_with_a_store(tmp_path):
    with running_servers(store=str(tmp_path / "room.db")) as servers:
        ws_senders = [ws_url(servers, name=f"sender{n}") for n in range(3)]
        listeners = [ws_url(servers, name=f"listener{n}") for n in range(2)]
        http_senders = [(servers.port, f"127.0.0.{10 + n}") for n in range(3)]
        results = chat_from_everywhere(ws_senders, listeners, http_senders)
        stored = get(servers.port, "/messages?limit=1000")[1]["messages"]
    assert_everyone_got(results, stored)
    with contextlib.closing(sqlite3.connect(tmp_path / "room.db")) as db:
        on_disk = db.execute("SELECT id, text FROM messages ORDER BY id").fetchall()
    assert on_disk == [(m["id"], m["text"]) for m in stored]


def test_a_ref_sent_again_while_its_message_is_being_written_is_stored_once(tmp_path):
    with running_servers(store=str(tmp_path / "room.db")) as servers:

        async def twice():
            return await asyncio.gather(*(chat.room.post("ann", "once", "r") for _ in range(2)))

        (first, stored_now), (again, stored_again) = chat.ask_room(twice())
        assert (stored_now, stored_again) == (True, False) and again == first
        assert stored_texts(servers.port) == ["once"]


def test_a_store_that_cannot_write_refuses_the_message_and_keeps_serving(tmp_path):
    with running_servers(store=str(tmp_path / "room.db")) as servers:
        assert post(servers.port, "/messages", {"text": "before"})[0] == 201
        db = chat.room.file.db  # the writer's own connection: no write is under way now
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")  # a full disk, as SQLite sees it
        with joined(servers) as (ws, _):
            answers = [post(servers.port, "/messages", {"text": "x" * 2000}) for _ in range(4)]
            status, body = answers[-1]  # the free room of the file's last page is taken by now
            assert status == 503 and "cannot store messages" in body["errors"]["room"]
            ws.send(json.dumps({"type": "message", "text": "y" * 2000, "ref": "y"}))
            assert receive(ws, "error") == {
                "type": "error",
                "error": "the chat cannot store messages right now: try again soon",
                "ref": "y",
                "retry_after": 1,  # the page sends it again by itself, once there is room
            }
            db.execute("PRAGMA max_page_count = 1073741823")  # room again
            assert post(servers.port, "/messages", {"text": "after"})[0] == 201
            assert receive(ws, "message")["text"] == "after"  # nothing refused was delivered
        stored = ["x" * 2000 for status, _ in answers if status == 201]
        assert stored_texts(servers.port) == ["before", *stored, "after"]
