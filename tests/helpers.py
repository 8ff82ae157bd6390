"""What the tests call: requests over HTTP, websocket clients, waiting for a condition, the chat
as a process (ChatProcess), redis-server (RedisServer), nginx (Nginx), a relay that can go
silent (Relay). The fixtures that use them are in fixtures.py.

Most tests start the servers in this process on free ports (running_servers: fast); the
command line, signals and exit codes are tested on `python chat.py` run as a subprocess.
"""

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import http.client
import json
import logging
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import chat  # before hug and anything that imports it: chat.py keeps hug away from NumPy 2

# isort: split
import pytest
import segno
import websockets
from websockets.asyncio.client import connect as async_connect
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent  # where chat.py is
CHAT_PY = ROOT / "chat.py"
TOOLS = ROOT / "tools"


RUNNING = []  # the servers running_servers() started, the newest last


def the_room():
    """The room of the servers this test runs (the newest running_servers())."""
    return RUNNING[-1].room


def ask_room(coroutine):
    """chat.ask_room() for the room of the servers this test runs."""
    return chat.ask_room(the_room(), coroutine)


@contextlib.contextmanager
def running_servers(host="127.0.0.1", **options):
    """The chat on free ports in this process; stopped after the block (unless the test stopped
    it itself, to test stop()), and no thread of it may outlive stop()."""
    threads_before = set(threading.enumerate())
    servers = chat.Servers(chat.Settings(host=host, port=0, ws_port=0, **options))
    RUNNING.append(servers)
    try:
        yield servers
    finally:
        RUNNING.remove(servers)
        if servers.loop_thread.is_alive():  # stop() ends the loop's thread
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
            await the_room().post(name, f"m{n}")

    ask_room(post_all())


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


async def collect_messages(ws, count):
    """The ids and texts of the next `count` messages on an asyncio client."""
    ids, texts = [], []
    while len(ids) < count:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame["type"] == "message":
            ids.append(frame["id"])
            texts.append(frame["text"])
    return ids, texts


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


def open_fds():
    return len(os.listdir("/proc/self/fd"))


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


def assert_room_is_sound(server):
    messages = get(server.port, "/messages?limit=1000")[1]["messages"]
    ids = [m["id"] for m in messages]
    assert ids == sorted(set(ids))
    for message in messages:
        assert 1 <= len(message["text"]) <= 2000 and message["text"] == message["text"].strip()
        assert 1 <= len(message["name"]) <= 32 and message["name"] == message["name"].strip()


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


def seed_big(count):
    """`count` messages of 2000 emoji (8 KB each), straight into the room."""

    async def post_all():
        for _ in range(count):
            await the_room().post("big", "😀" * 2000)

    ask_room(post_all())


def server_waits_for_a_client(servers):
    """True when the server holds back writes to some client because it does not read."""

    async def any_paused():
        return any(connection.paused for connection in servers.ws_server.all_connections)

    return asyncio.run_coroutine_threadsafe(any_paused(), servers.loop).result(5)


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


def say(page, text):
    """Types `text` and sends it: Enter, or on a touch screen the Send button."""
    page.fill("#message-input", text)
    if getattr(page, "touch", False):
        page.get_by_role("button", name="Send").click()
    else:
        page.press("#message-input", "Enter")


def texts(page):
    return page.locator("#chat-box .message .text")


def wait_in_page(page, condition, timeout=10):
    """Lets the page run until `condition()` holds (Playwright delivers events meanwhile)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the page"
        page.wait_for_timeout(50)


REBIND = "rebind.example"  # a name an attacker could point at 127.0.0.1


ALL_ROUTES = [
    ("GET", "/"),
    ("GET", "/chat"),
    ("GET", "/config"),
    ("GET", "/messages"),
    ("GET", "/get_messages"),
    ("GET", "/health"),
    ("GET", "/invite"),
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


PUBLIC = "https://chat.example.org"


ROOM_KEY = "a-room-key-for-the-tests-0123"  # what --key takes: 16 or more of [A-Za-z0-9_-]


def flood(port, forwarded_for, source="127.0.0.1", count=25):
    """`count` posts at once, each naming the next address of `forwarded_for` in X-Forwarded-For."""
    statuses = []
    for n in range(count):
        headers = {"X-Forwarded-For": forwarded_for[n % len(forwarded_for)]}
        statuses.append(
            request(port, "POST", "/messages", {"text": f"m{n}"}, headers=headers, source=source)[0]
        )
    return statuses


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


def connect_from(servers, source, path="/", query=(), **options):
    """An asyncio websocket client from address `source` (at `path`, with `query`), that reads
    whatever comes: the asyncio twin of joined()."""
    options = {"max_queue": None, "open_timeout": 5, **options}
    return async_connect(ws_url(servers, path, **dict(query)), local_addr=(source, 0), **options)


QR_HALVES = {" ": (0, 0), "▀": (1, 0), "▄": (0, 1), "█": (1, 1)}  # (top, bottom); 1 is dark
BLACK_ON_WHITE, RESET = "\x1b[30;107m", "\x1b[0m"  # each line of the QR code: dark drawn black


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


def record_statuses(page):
    page.evaluate("""() => {
        window.statuses = [];
        new MutationObserver(() => statuses.push(document.getElementById("status").textContent))
            .observe(document.getElementById("status"), {childList: true, characterData: true, subtree: true});
    }""")


CODE_MESSAGE = (
    "run `python chat.py --open` first, then:\n"
    "```python\n"
    "def greet(name):\n"
    "    return f'<b>{name}</b>'  # see https://example.org/in-code\n"
    "```\n"
    "docs at https://example.org/docs"
)


RTL_NAME = "أحمد"  # Ahmad


RTL_TEXT = "مرحبا بالجميع"  # hello everyone


def rename(ws, name):
    ws.send(json.dumps({"type": "name", "name": name}))


FIN_WAIT_1 = "04"  # the state's number in /proc/net/tcp


def unsent_in_closed_sockets(port):
    """Bytes the kernel still holds to send from server sockets on `port` that the chat has
    closed (FIN-WAIT-1: its close waits behind data the client never took)."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("the kernel's sockets are read from /proc/net/tcp (Linux)")
    total = 0
    for line in table.read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        tx_queue = int(fields[4].split(":")[0], 16)
        if local_port == port and fields[3] == FIN_WAIT_1:
            total += tx_queue
    return total
