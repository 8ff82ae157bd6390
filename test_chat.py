"""The contract (README "Protocol"), checked against real servers and real clients.

Most tests start the servers in this process on free ports (fast); the command line,
signals and exit codes are tested on `python chat.py` run as a subprocess.
"""

import asyncio
import base64
import contextlib
import http.client
import json
import os
import queue
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import chat  # before hug: chat.py keeps hug away from NumPy 2
import hug
import pytest
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as async_connect
from websockets.sync.client import connect

CHAT_PY = Path(__file__).with_name("chat.py")


# --- Helpers ---------------------------------------------------------------------------


@pytest.fixture
def server():
    """The chat on free ports in this process; stopped, threads and all, after the test."""
    threads_before = set(threading.enumerate())
    servers = chat.Servers("127.0.0.1", 0, 0, history=1000)
    yield servers
    servers.stop()
    assert set(threading.enumerate()) <= threads_before, "a server thread outlived stop()"


@pytest.fixture
def small_server():
    servers = chat.Servers("127.0.0.1", 0, 0, history=3)
    yield servers
    servers.stop()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(port, method, path, body=None, content_type="application/json", headers=(), source="127.0.0.1"):
    """One HTTP request from address `source`; returns (status, content type, body bytes).

    Posts are rate-limited per client address: tests that post a lot use several
    loopback addresses (127.0.0.0/8 is all this machine), as many people would.
    """
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type, **dict(headers)})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def get(port, path):
    status, _, body = request(port, "GET", path)
    return status, json.loads(body)


def post(port, path, body, content_type="application/json", source="127.0.0.1"):
    status, _, data = request(port, "POST", path, body, content_type, source=source)
    return status, json.loads(data)


def wait_for_health(port, timeout=10, **expected):
    """Polls /health until it shows `expected` (say clients=0), or fails after `timeout`."""
    for _ in range(int(timeout / 0.05)):
        health = get(port, "/health")[1]
        if all(health[key] == value for key, value in expected.items()):
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"/health never showed {expected}: {health}")


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
def joined(servers, **query):
    """A sync websocket client in the room, and the history frame it got first.

    max_queue=None: it reads everything the server sends at once, so a test that leaves
    frames unread does not look like a slow reader to the server.
    """
    with connect(ws_url(servers, **query), open_timeout=5, max_queue=None) as ws:
        yield ws, receive(ws, "history")


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
    status, message = post(server.port, "/messages", "name=j%C3%B6rg&text=a,b,c", "application/x-www-form-urlencoded")
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
    status, message = post(server.port, "/send_message", "message=old+style", "application/x-www-form-urlencoded")
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
    ({"text": None}, "text", "must be a string"),
    ({"text": "\ud800"}, "text", "not valid Unicode"),
    ({"text": "hi", "name": "n" * 33}, "name", "longer than 32"),
    ({"text": "hi", "name": ""}, "name", "empty"),
    ({"text": "hi", "name": 7}, "name", "must be a string"),
    ({"text": "hi", "name": "a\nb"}, "name", "control characters"),
]


@pytest.mark.parametrize("body, field, rule", BAD_POSTS)
def test_bad_post_is_a_400_naming_the_field_and_rule(body, field, rule):
    response = hug.test.post(chat, "/messages", json.dumps(body), headers={"content-type": "application/json"})
    assert response.status == hug.HTTP_400
    assert rule in response.data["errors"][field]


def test_exactly_2000_characters_of_emoji_are_accepted(server):
    status, message = post(server.port, "/messages", {"text": "😀" * 2000})
    assert status == 201 and len(message["text"]) == 2000


@pytest.mark.parametrize(
    "body, content_type",
    [
        ("{not json", "application/json"),
        (b"\xff\xfe", "application/json"),
        ("[" * 20000, "application/json"),
        ('{"text": "hi"}', "application/json; charset=bogus-charset"),
        (b"text=\xff", "application/x-www-form-urlencoded"),
        (b"\xff", "text/plain; charset=bogus-charset"),
    ],
)
def test_unreadable_body_is_a_400_not_a_500(server, body, content_type):
    status, _, data = request(server.port, "POST", "/messages", body, content_type)
    assert status in (400, 201)  # a bogus charset is ignored: JSON is UTF-8
    if status == 400:
        assert "body" in json.loads(data)["errors"]


@pytest.mark.parametrize(
    "query, field",
    [("since=x", "since"), ("since=-1", "since"), ("since=%C2%B2", "since"), ("since=" + "9" * 5000, "since"),
     ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=" + "1" * 5000, "limit"), ("limit=%C2%B2", "limit")],
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
    content_types = ["application/json", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                     "text/plain", "application/json; charset=latin-1"]
    for _ in range(400):
        body = rng.randbytes(rng.randrange(0, 300))
        method, path, content_type = rng.choice(["GET", "POST"]), rng.choice(paths), rng.choice(content_types)
        status, _, _ = request(server.port, method, path, body, content_type, source=f"127.0.1.{rng.randrange(1, 255)}")
        assert status < 500
    assert get(server.port, "/health")[0] == 200


# --- The websocket room ----------------------------------------------------------------


def test_history_comes_first_with_the_last_50(server):
    seed(60)
    with joined(server) as (ws, history):
        assert [m["id"] for m in history["messages"]] == list(range(11, 61))


def test_since_resumes_with_every_kept_message_after_it(server):
    seed(60)
    with joined(server, since=5) as (ws, history):
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


def presence_changes(ws, until):
    """Presence frames until `until(changes so far)`; returns the changes and the last frame."""
    changes = []
    while not until(changes):
        frame = receive(ws, "presence")
        changes += frame["changes"]
    return changes, frame


def test_presence_on_join_rename_and_leave(server):
    with joined(server, name="alice") as (alice, _):
        joined_alone = receive(alice, "presence")
        assert joined_alone == {"type": "presence", "online": ["alice"], "joined": "alice", "changes": [{"joined": "alice"}]}
        with joined(server, name="bob") as (bob, _):
            bob.send(json.dumps({"type": "name", "name": "robert"}))
            changes, frame = presence_changes(alice, until=lambda changes: len(changes) == 2)
            assert changes == [{"joined": "bob"}, {"renamed": {"from": "bob", "to": "robert"}}]
            assert frame["online"] == ["alice", "robert"]
        left = receive(alice, "presence")
        assert left["online"] == ["alice"] and left["left"] == "robert"


def test_a_burst_of_joins_is_sent_as_few_presence_frames(server):
    with joined(server, name="watcher") as (watcher, _):
        receive(watcher, "presence")  # its own join: the next changes wait for the 0.25 s window
        with contextlib.ExitStack() as stack:
            for n in range(10):
                stack.enter_context(joined(server, name=f"p{n}"))
            frames = 0
            changes = []
            while len(changes) < 10:
                changes += receive(watcher, "presence")["changes"]
                frames += 1
            assert changes == [{"joined": f"p{n}"} for n in range(10)]
            assert frames < 10


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
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        with connect(ws_url(server, "/nope"), open_timeout=5):
            pass
    assert refused.value.response.status_code == 404


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
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1009


def test_more_than_20_at_once_gets_too_fast_errors_and_nothing_is_stored(server):
    with joined(server) as (ws, _):
        for n in range(40):
            ws.send(f"m{n}")
        frames = [receive_any(ws) for _ in range(40)]
        messages = [f for f in frames if f["type"] == "message"]
        errors = [f for f in frames if f["type"] == "error"]
        assert [m["text"] for m in messages[:20]] == [f"m{n}" for n in range(20)]  # the burst
        assert len(messages) <= 24 and len(errors) == 40 - len(messages)  # a refill or two, no more
        assert "too fast" in errors[0]["error"]
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


def receive_any(ws):
    """The next message or error frame."""
    while True:
        frame = json.loads(ws.recv(timeout=5))
        if frame["type"] in ("message", "error"):
            return frame


@pytest.mark.parametrize(
    "origin, allowed",
    [
        (None, True),
        ("http://127.0.0.1:{port}", True),
        ("http://evil.example:{port}", False),
        ("http://127.0.0.1:1", False),
        ("https://127.0.0.1:{port}", False),
        ("null", False),
    ],
)
def test_origin_must_be_the_chat_page(server, origin, allowed):
    headers = {"Origin": origin.format(port=server.port)} if origin else {}
    if allowed:
        with connect(ws_url(server), open_timeout=5, origin=headers.get("Origin")) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "history"
    else:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            with connect(ws_url(server), open_timeout=5, origin=headers["Origin"]):
                pass
        assert refused.value.response.status_code == 403


def test_localhost_page_may_connect_to_localhost(server):
    url = f"ws://localhost:{server.ws_port}/"
    with connect(url, open_timeout=5, origin=f"http://localhost:{server.port}") as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "history"


# --- One order for everyone ------------------------------------------------------------

WS_SENDERS, WS_EACH = 5, 20  # 20 each, all at once: within the burst, so no rate limit applies
HTTP_SENDERS, HTTP_EACH = 5, 20  # each from its own address: the HTTP limit is per address
LISTENERS = 3


def test_concurrent_websocket_and_http_senders_give_everyone_the_same_order(server):
    total = WS_SENDERS * WS_EACH + HTTP_SENDERS * HTTP_EACH

    async def websocket_sender(ws, n):
        for i in range(WS_EACH):
            await ws.send(json.dumps({"type": "message", "text": f"ws{n}-{i}"}))

    def http_sender(n):
        for i in range(HTTP_EACH):
            message = {"name": f"http{n}", "text": f"http{n}-{i}"}
            assert post(server.port, "/messages", message, source=f"127.0.0.{10 + n}")[0] == 201

    async def run():
        clients = [await async_connect(ws_url(server, name=f"c{n}"), max_queue=None) for n in range(WS_SENDERS + LISTENERS)]
        for ws in clients:  # everyone is in the room before the first message
            assert json.loads(await ws.recv())["type"] == "history"
        received = asyncio.gather(*(collect_messages(ws, total) for ws in clients))
        await asyncio.gather(
            *(websocket_sender(ws, n) for n, ws in enumerate(clients[:WS_SENDERS])),
            *(asyncio.to_thread(http_sender, n) for n in range(HTTP_SENDERS)),
        )
        results = await asyncio.wait_for(received, 30)
        for ws in clients:
            await ws.close()
        return results

    results = asyncio.run(run())
    _, stored = get(server.port, f"/messages?limit={total}")
    expected_ids = list(range(1, total + 1))
    expected_texts = [m["text"] for m in stored["messages"]]
    assert [m["id"] for m in stored["messages"]] == expected_ids
    for ids, texts in results:
        assert ids == expected_ids
        assert texts == expected_texts
    for n in range(WS_SENDERS):  # each sender's messages keep the order it sent them in
        own = [t for t in expected_texts if t.startswith(f"ws{n}-")]
        assert own == [f"ws{n}-{i}" for i in range(WS_EACH)]


# --- Start-up and shutdown -------------------------------------------------------------


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_stop_closes_clients_with_1001_and_leaves_no_thread_or_socket():
    threads_before, fds_before = set(threading.enumerate()), open_fds()
    servers = chat.Servers("127.0.0.1", 0, 0)
    with joined(servers) as (ws, _):
        post(servers.port, "/messages", {"text": "hi"})
        servers.stop()
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1001
    assert set(threading.enumerate()) <= threads_before
    assert open_fds() <= fds_before


class ChatProcess:
    """`python chat.py ARGS` in a subprocess, with its printed ports read back."""

    def __init__(self, *args):
        self.process = subprocess.Popen(
            [sys.executable, str(CHAT_PY), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self):
        for line in self.process.stdout:
            self.lines.put(line)

    def urls(self):
        page, websocket = self.lines.get(timeout=15), self.lines.get(timeout=5)
        self.port = int(page.rsplit(":", 1)[1].strip("/\n"))
        self.ws_port = int(websocket.rsplit(":", 1)[1].strip("/\n"))
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

    def start(*args):
        started.append(ChatProcess(*args))
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
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1001
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


@pytest.mark.parametrize("args", [["--port", "http"], ["--port", "70000"], ["--history", "0"], ["--bogus"]])
def test_bad_flag_is_one_line_and_exit_2(chat_process, args):
    process = chat_process(*args)
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and error.startswith("chat.py: error:")


# --- Hardening: clients that misbehave on purpose -------------------------------------


def test_http_posts_past_the_limit_get_429_and_other_addresses_carry_on(server):
    statuses = [request(server.port, "POST", "/messages", {"text": f"flood {n}"}, source="127.0.0.5") for n in range(40)]
    assert [status for status, _, _ in statuses[:20]] == [201] * 20  # the burst
    refused = [body for status, _, body in statuses if status == 429]
    assert len(refused) >= 16 and "too fast" in json.loads(refused[0])["errors"]["text"]  # a refill or two
    assert all(status in (201, 429) for status, _, _ in statuses)
    assert post(server.port, "/messages", {"text": "someone else"}, source="127.0.0.6")[0] == 201
    assert len(get(server.port, "/messages")[1]["messages"]) == 40 - len(refused) + 1


def test_a_flooding_websocket_does_not_stop_anyone_else(server):
    with joined(server, name="flood") as (flood, _), joined(server, name="calm") as (calm, _):
        for n in range(60):
            flood.send(f"flood {n}")
        calm.send("calm one")
        texts = []
        while "calm one" not in texts:
            texts.append(receive(calm, "message")["text"])
        assert len(texts) <= 21  # at most the flood's burst came first
    stored = [m["text"] for m in get(server.port, "/messages?limit=1000")[1]["messages"]]
    assert "calm one" in stored and len(stored) <= 21 + 6  # the burst, plus what refilled meanwhile


def test_origin_of_the_lan_address_is_allowed_with_host_0_0_0_0():
    # 127.0.0.2 stands in for a LAN address: the page's own origin is whatever address was typed.
    servers = chat.Servers("0.0.0.0", 0, 0)
    try:
        url = f"ws://127.0.0.2:{servers.ws_port}/"
        with connect(url, open_timeout=5, origin=f"http://127.0.0.2:{servers.port}") as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "history"
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            with connect(url, open_timeout=5, origin=f"http://127.0.0.3:{servers.port}"):
                pass
        assert refused.value.response.status_code == 403
    finally:
        servers.stop()


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
            peak[0] = max(peak[0], *(c.transport.get_write_buffer_size() for c in chat.room.clients))

    with silent_client(server.ws_port), joined(server, name="reader") as (reader, _):
        ids, left = [], []
        for posted in range(batch, total + 1, batch):  # the reader reads each batch before the next
            chat.ask_room(post_batch())
            while len(ids) < posted:
                frame = json.loads(reader.recv(timeout=10))
                if frame["type"] == "message":
                    ids.append(frame["id"])
                elif frame["type"] == "presence":
                    left += [change["left"] for change in frame["changes"] if "left" in change]
        assert ids == list(range(1, total + 1))
        assert left == ["silent"]
        assert get(server.port, "/health")[1]["clients"] == 1
    assert peak[0] <= chat.MAX_QUEUED + 4096  # what the server held for the silent one stayed bounded


def test_a_client_that_never_answers_pings_is_dropped(monkeypatch):
    monkeypatch.setattr(chat, "PING_INTERVAL", 0.2)  # 20 s in real life; the mechanism is the same
    monkeypatch.setattr(chat, "PING_TIMEOUT", 0.3)
    servers = chat.Servers("127.0.0.1", 0, 0)
    try:
        with silent_client(servers.ws_port):
            wait_for_health(servers.port, timeout=5, clients=0)
    finally:
        servers.stop()


def test_invalid_utf8_closes_that_connection_with_1007_and_only_that_one(server):
    with joined(server, name="other") as (other, _):
        sock = socket.create_connection(("127.0.0.1", server.ws_port), timeout=5)
        with connect(ws_url(server), sock=sock, open_timeout=5) as bad:
            receive(bad, "history")
            sock.sendall(bytes([0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28]))  # a masked text frame, bad UTF-8
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                while True:
                    bad.recv(timeout=5)
            assert closed.value.rcvd.code == 1007
        other.send("still fine")
        assert receive(other, "message")["text"] == "still fine"


def test_a_fragmented_message_is_one_message(server):
    with joined(server) as (ws, _):
        ws.send(["frag", "men", "ted"])
        assert receive(ws, "message")["text"] == "fragmented"


@pytest.mark.parametrize(
    "text",
    ["tab\there\x00nul\x07bell", "\u202eright-to-left\u202c", "emoji 👩‍👩‍👧 🎉", "日本語のテキスト", "a\r\nb"],
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
        _, frame = presence_changes(ws, until=lambda changes: any("renamed" in c for c in changes))
        assert frame["online"] == ["😀" * 32]


@pytest.mark.parametrize(
    "since, expected", [("-1", None), ("abc", None), ("²", None), ("9" * 50, []), ("9" * 5000, None), ("1.5", None)]
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
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
frames = st.one_of(
    st.text(max_size=2500),
    st.binary(max_size=100),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["message", "name", "bogus", ""])},
        optional={"text": json_values | st.text(max_size=2100), "name": json_values | st.text(max_size=40)},
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
    @settings(max_examples=120, deadline=None, database=None)
    @given(st.lists(frames, min_size=1, max_size=6))
    def check(batch):
        with joined(server) as (ws, _):
            for frame in batch:
                ws.send(frame)
            ws.send("end of batch")  # every frame before it has been answered when it comes back
            while True:
                frame = json.loads(ws.recv(timeout=5))
                if frame["type"] == "message" and frame["text"] == "end of batch":
                    break

    check()
    assert_room_is_sound(server)
    assert get(server.port, "/health")[0] == 200


def test_fuzzed_http_requests_never_get_a_500(server):
    fields = st.dictionaries(st.sampled_from(["text", "name", "message", "since", "limit", "x"]), json_values)

    @settings(max_examples=150, deadline=None, database=None)
    @given(
        st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
        st.sampled_from(["/", "/chat", "/config", "/messages", "/get_messages", "/send_message", "/health"]),
        st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain",
                         "multipart/form-data; boundary=b", "application/json; charset=utf-16"]),
        st.one_of(st.binary(max_size=200), fields.map(lambda f: json.dumps(f).encode())),
        st.text(max_size=30).map(lambda q: urllib.parse.quote(q, safe="=&")),
        st.integers(1, 254),
    )
    def check(method, path, content_type, body, query, address):
        status, _, _ = request(server.port, method, f"{path}?{query}", body, content_type, source=f"127.0.2.{address}")
        assert status < 500

    check()
    assert_room_is_sound(server)


# A soak: clients that chat, drop and resume at random while HTTP posts run.

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
SOAK_CLIENTS = 100


def test_soak_clients_that_drop_and_resume_miss_nothing_and_leave_nothing_behind():
    threads_before, fds_before = set(threading.enumerate()), open_fds()
    servers = chat.Servers("127.0.0.1", 0, 0, history=100_000)
    rng = random.Random(7)
    seen = {n: [] for n in range(SOAK_CLIENTS)}  # every message id each client was shown, in order
    resumes = [0]

    async def client(n, deadline):
        while asyncio.get_running_loop().time() < deadline:
            since = seen[n][-1] if seen[n] else 0
            async with async_connect(ws_url(servers, name=f"soak{n}", since=since), max_queue=None) as ws:
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
                    except asyncio.TimeoutError:
                        continue
                    record(n, frame)
                if rng.random() < 0.5:
                    ws.transport.abort()  # half of the drops are abrupt, like a lost network
            await asyncio.sleep(rng.uniform(0, 0.3))

    def record(n, frame):
        batch = frame["messages"] if frame["type"] == "history" else [frame] if frame["type"] == "message" else []
        seen[n].extend(m["id"] for m in batch)

    async def catch_up(n, last_id):
        since = seen[n][-1] if seen[n] else 0
        async with async_connect(ws_url(servers, since=since), max_queue=None) as ws:
            while not seen[n] or seen[n][-1] < last_id:
                record(n, json.loads(await asyncio.wait_for(ws.recv(), 10)))

    def http_poster(stop):
        n = 0
        while not stop.wait(0.1):
            n += 1
            assert post(servers.port, "/messages", {"name": "http", "text": f"post {n}"}, source="127.0.3.1")[0] == 201

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
        last_id = asyncio.run(run())
    finally:
        stop.set()
        poster.join(10)
    try:
        assert resumes[0] > SOAK_CLIENTS * 2 and last_id > SOAK_SECONDS * 10
        for n in range(SOAK_CLIENTS):
            assert seen[n] == list(range(1, last_id + 1)), f"client {n} missed or doubled a message"
        wait_for_health(servers.port, timeout=5, clients=0)
    finally:
        servers.stop()
    assert set(threading.enumerate()) <= threads_before
    assert open_fds() <= fds_before


def test_sigterm_under_load_stops_within_5_seconds_with_1001_and_exit_0(chat_process):
    import time

    process = chat_process("--port", "0", "--ws-port", "0")
    process.urls()
    codes = []

    async def client(n, started):
        async with async_connect(f"ws://127.0.0.1:{process.ws_port}/?name=load{n}", max_queue=None) as ws:
            started.append(n)
            try:
                while True:
                    await ws.send(f"load {n}")  # 8 a second: under the rate limit
                    with contextlib.suppress(asyncio.TimeoutError):
                        while True:
                            await asyncio.wait_for(ws.recv(), 0.125)
            except websockets.exceptions.ConnectionClosed as closed:
                codes.append(closed.rcvd.code if closed.rcvd else None)

    async def run():
        started = []
        silent = await asyncio.to_thread(silent_client, process.ws_port)  # will not answer the close
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

    exit_code, took = asyncio.run(run())
    assert exit_code == 0 and took < 5
    assert codes == [1001] * 20


@pytest.mark.timeout(180)
def test_benchmark_quick_run_completes_and_loses_nothing(tmp_path):
    """Keeps bench_chat.py working; no speed is asserted (the machines are shared and noisy)."""
    bench = subprocess.run(
        [sys.executable, str(CHAT_PY.with_name("bench_chat.py")), "--quick", "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, timeout=150,
    )
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "| fan-out throughput, 100 receivers" in bench.stdout
    assert "Lost, duplicated or reordered deliveries in all runs: 0" in bench.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {row["scenario"] for row in rows} == {"throughput", "efficiency", "latency", "http", "memory"}


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


class RedisServer:
    def __init__(self, binary, port, directory):
        self.binary, self.port, self.directory = binary, port, directory
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self):
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            threading.Event().wait(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        self.process.terminate()  # SIGTERM: Redis writes its data and exits
        self.process.wait(10)


@pytest.fixture
def two_processes(redis_server, chat_process):
    processes = [chat_process("--port", "0", "--ws-port", "0", "--redis", redis_server.url) for _ in range(2)]
    for process in processes:
        process.urls()
    return processes


def test_redis_senders_on_both_processes_give_every_client_the_same_order(two_processes):
    a, b = two_processes
    each, total = 15, 4 * 15

    async def websocket_sender(ws, n):
        for i in range(each):
            await ws.send(f"ws{n}-{i}")

    def http_sender(process, n):
        for i in range(each):
            assert post(process.port, "/messages", {"text": f"http{n}-{i}"}, source=f"127.0.4.{n + 1}")[0] == 201

    async def run():
        urls = [f"ws://127.0.0.1:{p.ws_port}/" for p in (a, a, b, b)]
        clients = [await async_connect(url, max_queue=None) for url in urls]
        for ws in clients:
            assert json.loads(await ws.recv())["type"] == "history"
        received = asyncio.gather(*(collect_messages(ws, total) for ws in clients))
        await asyncio.gather(
            websocket_sender(clients[0], 0), websocket_sender(clients[2], 1),
            asyncio.to_thread(http_sender, a, 0), asyncio.to_thread(http_sender, b, 1),
        )
        results = await asyncio.wait_for(received, 30)
        for ws in clients:
            await ws.close()
        return results

    results = asyncio.run(run())
    stored_a = get(a.port, "/messages")[1]["messages"]
    assert stored_a == get(b.port, "/messages")[1]["messages"]
    assert [m["id"] for m in stored_a] == list(range(1, total + 1))
    for ids, texts in results:
        assert ids == list(range(1, total + 1))
        assert texts == [m["text"] for m in stored_a]


def test_redis_a_client_can_resume_on_the_other_process_and_miss_nothing(two_processes):
    a, b = two_processes
    with connect(f"ws://127.0.0.1:{a.ws_port}/", open_timeout=5, max_queue=None) as ws:
        room_id = receive(ws, "history")["room"]
        for n in range(3):
            post(a.port, "/messages", {"text": f"before {n}"})
        last_seen = [receive(ws, "message")["id"] for _ in range(3)][-1]
    for n in range(3):
        post(b.port, "/messages", {"text": f"while away {n}"})
    url = f"ws://127.0.0.1:{b.ws_port}/?since={last_seen}&room={room_id}"
    with connect(url, open_timeout=5, max_queue=None) as ws:
        history = receive(ws, "history")
        assert history["room"] == room_id
        assert [m["text"] for m in history["messages"]] == [f"while away {n}" for n in range(3)]


def test_redis_going_away_gives_errors_and_degraded_health_then_recovers(redis_server, two_processes):
    a, b = two_processes
    post(a.port, "/messages", {"text": "before"})
    with connect(f"ws://127.0.0.1:{a.ws_port}/", open_timeout=5, max_queue=None) as on_a, \
            connect(f"ws://127.0.0.1:{b.ws_port}/", open_timeout=5, max_queue=None) as on_b:
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
    assert [m["text"] for m in get(a.port, "/messages")[1]["messages"]] == ["before", "back"]


def test_redis_restarted_without_its_data_ids_go_on_and_nothing_is_doubled(redis_server, two_processes):
    a, b = two_processes
    for n in range(3):
        post(a.port, "/messages", {"text": f"before {n}"})
    with connect(f"ws://127.0.0.1:{b.ws_port}/", open_timeout=5, max_queue=None) as on_b:
        assert len(receive(on_b, "history")["messages"]) == 3
        redis_server.stop()
        shutil.rmtree(redis_server.directory)  # a Redis that keeps nothing, or a new one
        redis_server.directory.mkdir()
        redis_server.start()
        wait_for_health(a.port, status="ok")  # the first command after a restart finds its connection cut
        status, message = post(a.port, "/messages", {"text": "after"})
        assert status == 201 and message["id"] == 4
        assert (receive(on_b, "message")["id"]) == 4
    assert [m["id"] for m in get(b.port, "/messages")[1]["messages"]] == [1, 2, 3, 4]


def test_redis_unreachable_at_start_is_one_line_and_exit_2(chat_process):
    process = chat_process("--port", "0", "--ws-port", "0", "--redis", f"redis://127.0.0.1:{free_port()}/0")
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and "cannot reach Redis" in error


def test_the_default_chat_does_not_import_redis():
    code = "import sys, chat; s = chat.Servers(port=0, ws_port=0); s.stop(); print('redis' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=CHAT_PY.parent)
    assert result.stdout.strip() == "False", result.stderr


# --- The page in a real browser (Playwright driving Debian's Chromium) -----------------
# Last in the file: Playwright's sync API keeps its own event loop for the session.

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "Playwright is not installed: python -m pip install -r requirements-test.txt"
    else:
        missing = None if os.path.exists(CHROMIUM) else f"no Chromium at {CHROMIUM}: apt-get install chromium"
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

    def open_as(port, name=None):
        context = browser.new_context()
        contexts.append(context)
        if name:
            context.add_init_script(f"localStorage.setItem('chat-name', {json.dumps(name)})")
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        page.on("console", lambda msg: "Content Security Policy" in msg.text and problems.append(msg.text))
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.goto(f"http://127.0.0.1:{port}/")
        expect(page.locator("#status")).to_have_text("online")
        return page

    yield open_as
    for context in contexts:
        context.close()
    assert problems == []


def say(page, text):
    page.fill("#message-input", text)
    page.press("#message-input", "Enter")


def texts(page):
    return page.locator("#chat-box .message p")


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
    expect(alice.locator("#chat-box .message.own p")).to_have_text(["one", "two", "three"])
    expect(bob.locator("#chat-box .message.own p")).to_have_text(["four"])


def test_browser_renders_markup_as_text_and_runs_nothing(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "mallory")
    attacks = ['<img src=x onerror="window.pwned=1">', "<script>window.pwned=1</script>", "<b>bold</b>"]
    for attack in attacks:
        say(page, attack)
    post(server.port, "/messages", {"name": "<i onmouseover=alert(1)>x</i>", "text": "<svg onload=alert(1)>"})
    expect(texts(page)).to_have_text(attacks + ["<svg onload=alert(1)>"])
    assert page.locator("#chat-box img, #chat-box script, #chat-box b, #chat-box svg, #chat-box i").count() == 0
    assert page.evaluate("window.pwned") is None


def test_browser_shows_history_on_load_and_who_is_online(server, open_page):
    from playwright.sync_api import expect

    for text in ["earlier 1", "earlier 2"]:
        post(server.port, "/messages", {"name": "carol", "text": text})
    alice = open_page(server.port, "alice")
    expect(texts(alice)).to_have_text(["earlier 1", "earlier 2"])
    open_page(server.port, "bob")
    expect(alice.locator("#online li")).to_have_text(["alice", "bob"])
    expect(alice.locator("#chat-box .notice").last).to_have_text("bob joined")


def test_browser_does_not_send_an_empty_message(server, open_page):
    page = open_page(server.port)
    say(page, "   ")
    say(page, "real")
    from playwright.sync_api import expect

    expect(texts(page)).to_have_text(["real"])
    assert [m["text"] for m in get(server.port, "/messages")[1]["messages"]] == ["real"]


def test_browser_shows_server_errors_next_to_the_input(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)
    page.evaluate("""() => {
        const form = document.getElementById("chat-form");
        for (let n = 0; n < 30; n++) {
            document.getElementById("message-input").value = "burst " + n;
            form.requestSubmit();
        }
    }""")
    expect(page.locator("#chat-error")).to_contain_text("too fast")
    expect(page.locator("#message-input")).to_have_value("burst 29")  # refused text is put back


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
    post(second.port, "/messages", {"text": "new 1"})  # id 1 again: only the room id tells them apart
    expect(texts(page)).to_have_text(["old 1", "old 2", "old 3", "new 1"])
    expect(page.locator("#chat-box .notice", has_text="restarted")).to_have_count(1)
    post(second.port, "/messages", {"text": "new 2"})
    expect(texts(page)).to_have_text(["old 1", "old 2", "old 3", "new 1", "new 2"])


def test_screenshot_script_still_makes_a_picture(browser, tmp_path):
    sys.path.insert(0, str(Path(__file__).with_name("docs")))
    from screenshot import make_screenshot

    make_screenshot(browser, tmp_path / "shot.png")
    assert (tmp_path / "shot.png").read_bytes().startswith(b"\x89PNG")


# --- The workshop walkthrough, run as the README writes it -----------------------------
# Every shell command of the README's walkthrough runs as written (real curl, the real
# `python -m websockets` client fed through its stdin), with the ports swapped for free ones,
# and what the README says you will see is checked. A command the test does not know, or one
# it looks for and cannot find, fails the test: a walkthrough step cannot break silently.

README = Path(__file__).with_name("README.md")
ESCAPES = re.compile(r"\x1b(\[[0-9;]*[A-Za-z]|[78])")  # the interactive client's cursor moves


class Walkthrough:
    """The README's walkthrough: its shell commands, and its example output blocks."""

    def __init__(self, port, ws_port):
        section = README.read_text(encoding="utf-8").split("## Workshop walkthrough", 1)[1].split("\n## ", 1)[0]
        blocks = re.findall(r"```(\w*)\n(.*?)```", section, flags=re.DOTALL)
        self.commands = [line for kind, body in blocks if kind == "sh"
                         for line in body.replace("\\\n", "").splitlines() if line.strip()]
        self.outputs = [body for kind, body in blocks if kind == ""]
        self.port, self.ws_port = port, ws_port
        self.unused = list(self.commands)

    def take(self, pattern):
        """The one command that matches `pattern` (a regex, matched whole), ports swapped."""
        found = [command for command in self.commands if re.fullmatch(pattern, " ".join(command.split()))]
        assert len(found) == 1, f"the README's walkthrough has {found} for {pattern!r}: update the README or this test"
        self.unused.remove(found[0])
        return self.swap_ports(found[0])

    def swap_ports(self, text):
        return text.replace(":8000", f":{self.port}").replace(":8765", f":{self.ws_port}")


class Terminal:
    """A command typed into a shell, as a reader would: lines go to its stdin, output is read back."""

    def __init__(self, command):
        command = re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", command)
        self.process = subprocess.Popen(
            ["bash", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=CHAT_PY.parent,
        )
        self.lines, self.errors = queue.Queue(), []  # stderr: curl's progress meter, tracebacks
        self.readers = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=lambda: self.errors.extend(self.process.stderr), daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read(self):
        for line in self.process.stdout:
            for part in ESCAPES.sub("\n", line).splitlines():
                self.lines.put(part.removeprefix("> "))

    def type(self, line):
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def expect(self, wanted, timeout=10):
        """The next output line for which `wanted(line)` is true (or that starts with `wanted`)."""
        check = wanted if callable(wanted) else lambda line: line.startswith(wanted)
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"never saw {wanted!r}; saw {seen}") from None
            seen.append(line)
            if check(line):
                return line

    def expect_frame(self, kind, **fields):
        """The next frame (`< {...}` from the interactive client) of this type with these fields."""
        def matches(line):
            if not line.startswith("< {"):
                return False
            frame = json.loads(line[2:])
            return frame["type"] == kind and all(frame.get(key) == value for key, value in fields.items())
        return json.loads(self.expect(matches)[2:])

    def output(self, timeout=10):
        """Everything it printed, once it has finished."""
        self.process.wait(timeout)
        self.readers[0].join(timeout)
        return "\n".join(self.lines.queue)

    def close(self):
        """Ctrl+D, as the README says; then make sure it is gone."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for reader in self.readers:
            reader.join(5)
        self.process.stdout.close()
        self.process.stderr.close()
        if not self.process.stdin.closed:
            self.process.stdin.close()


@pytest.fixture
def terminals():
    opened = []

    def open_terminal(command):
        opened.append(Terminal(command))
        return opened[-1]

    yield open_terminal
    for terminal in opened:
        if terminal.process.poll() is None:
            terminal.process.send_signal(signal.SIGINT)  # Ctrl+C
        terminal.close()
        assert "Traceback" not in "".join(terminal.errors)


def test_the_workshop_walkthrough_works_as_written(terminals):
    if shutil.which("curl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the walkthrough test must run under CI: apt-get install curl")
        pytest.skip("no curl on this machine: apt-get install curl")
    steps = Walkthrough(free_port(), free_port())

    # Start: `python chat.py` prints the two URLs the README shows (here on free ports).
    server = terminals(steps.take(r"python chat\.py") + f" --port {steps.port} --ws-port {steps.ws_port}")
    printed = [server.expect("Chat page:"), server.expect("Websocket:")]
    assert printed == steps.swap_ports(steps.outputs[0]).splitlines()

    # 1. Echo: what you type comes straight back.
    echo = terminals(steps.take(r"python -m websockets ws://127\.0\.0\.1:8765/echo"))
    echo.expect("Connected to")
    echo.type("hello")
    echo.expect("< hello")
    echo.close()

    # 2. Broadcast: alice and bob each get history first; "hello" from alice reaches both.
    alice = terminals(steps.take(r'python -m websockets "ws://127\.0\.0\.1:8765/\?name=alice"'))
    alice.expect_frame("history")
    bob = terminals(steps.take(r'python -m websockets "ws://127\.0\.0\.1:8765/\?name=bob"'))
    bob.expect_frame("history")
    alice.type("hello")
    for person in (alice, bob):
        assert person.expect_frame("message", text="hello") | {"ts": "..."} == {
            "type": "message", "id": 1, "name": "alice", "text": "hello", "ts": "...",
        }
    for frame in steps.outputs[1].splitlines():  # the JSON frames the README shows
        alice.type(frame)
    assert bob.expect_frame("message", text="hi")["name"] == "alice"
    bob.expect(lambda line: line.startswith("< {") and '"to": "alice2"' in line)

    # 3. History and resuming: bob leaves, alice says more, bob comes back with since=1.
    bob.close()
    for text in ["while bob was away", "and more"]:
        alice.type(text)
        alice.expect_frame("message", text=text)
    bob = terminals(steps.take(r'python -m websockets "ws://127\.0\.0\.1:8765/\?name=bob&since=1"'))
    history = bob.expect_frame("history")
    assert [m["text"] for m in history["messages"]] == ["hi", "while bob was away", "and more"]

    # 4. Posting over HTTP with curl: stored, broadcast to both, listed, counted.
    posted = terminals(steps.take(r"curl -X POST http://127\.0\.0\.1:8000/messages .*hello from HTTP.*"))
    assert json.loads(posted.output())["text"] == "hello from HTTP"
    for person in (alice, bob):
        assert person.expect_frame("message", text="hello from HTTP")["name"] == "curl"
    listed = terminals(steps.take(r'curl "http://127\.0\.0\.1:8000/messages\?since=0"'))
    assert [m["text"] for m in json.loads(listed.output())["messages"]][-1] == "hello from HTTP"
    health = terminals(steps.take(r"curl http://127\.0\.0\.1:8000/health"))
    assert json.loads(health.output())["status"] == "ok"

    # 5. Bad input: a 400 naming the problem over HTTP; an error frame over the websocket.
    bad = terminals(steps.take(r"curl -X POST http://127\.0\.0\.1:8000/messages .*\{oops'"))
    assert "not valid JSON" in json.loads(bad.output())["errors"]["body"]
    alice.type("")
    assert alice.expect_frame("error")["error"] == "text is empty"
    alice.type("still here")
    alice.expect_frame("message", text="still here")

    # 6. Start-up and shutdown: port 0 picks free ports; Ctrl+C stops it, exit status 0.
    another = terminals(steps.take(r"python chat\.py --port 0 --ws-port 0"))
    assert re.fullmatch(r"Chat page:  http://127\.0\.0\.1:[1-9]\d*/", another.expect("Chat page:"))
    assert re.fullmatch(r"Websocket:  ws://127\.0\.0\.1:[1-9]\d*/", another.expect("Websocket:"))
    another.process.send_signal(signal.SIGINT)
    another.expect("Stopped.")
    assert another.process.wait(5) == 0

    assert steps.unused == [], "walkthrough commands this test does not run: teach it the new step"
