"""The websocket server's sockets: what a connection may hold in the kernel, whose voice an
address is on a LAN, handshakes for paths that are no URL, and the event loop it runs on."""

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys

import chat
from parts import voices

# isort: split
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosedOK

from tests.helpers import (
    ROOT,
    ask_room,
    connect,
    raw_handshake,
    receive_history,
    running_servers,
    seed_big,
    silent_client,
    the_room,
    tracebacks,
    unsent_in_closed_sockets,
    wait_for_health,
    wait_until,
    ws_url,
)

# --- What one connection, and one address, may hold in flight ---------------------------

# What the kernel may hold for one connection: twice SO_SNDBUF, and it may go past that by the
# one packet it was filling (up to 64 KB on loopback)
KERNEL_SHARE = 2 * voices.SEND_BUFFER + 64 * 1024


def kernel_send_queues(servers):
    """Bytes the kernel holds for each websocket connection, not yet taken by its client
    (TIOCOUTQ, which is SIOCOUTQ for a socket), by client address."""
    fcntl = pytest.importorskip("fcntl", reason="the send queues are read with ioctl (Unix)")
    termios = pytest.importorskip("termios", reason="the send queues are read with ioctl (Unix)")

    async def measure():
        queues = {}
        for connection in servers.ws_server.all_connections:
            sock = connection.transport.get_extra_info("socket")
            unsent = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
            queues.setdefault(connection.remote_address[0], []).append(
                struct.unpack("i", unsent)[0]
            )
        return queues

    return asyncio.run_coroutine_threadsafe(measure(), servers.loop).result(5)


def clients_waited_for(servers):
    """How many websocket connections the server holds back writes to: they do not read."""

    async def count():
        return sum(connection.paused for connection in servers.ws_server.all_connections)

    return asyncio.run_coroutine_threadsafe(count(), servers.loop).result(5)


@contextlib.contextmanager
def resumes_that_never_read(servers, count, source):
    """`count` clients from address `source` that resume with since=0, read the handshake's
    answer and then nothing."""
    with contextlib.ExitStack() as stack:
        for _ in range(count):
            sock = stack.enter_context(
                socket.create_connection(
                    ("127.0.0.1", servers.ws_port), timeout=5, source_address=(source, 0)
                )
            )
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(
                f"GET /?since=0 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            assert sock.recv(12) == b"HTTP/1.1 101"
        yield


def test_a_client_that_resumes_and_never_reads_holds_a_bounded_kernel_buffer(big_room):
    with resumes_that_never_read(big_room, 1, "127.0.0.2"):
        wait_until(lambda: clients_waited_for(big_room) == 1, what="the server waiting for it")
        (unsent,) = kernel_send_queues(big_room)["127.0.0.2"]
    assert unsent <= KERNEL_SHARE  # it was 4 MB, the kernel's maximum here


@pytest.mark.timeout(60)
def test_one_address_catches_up_on_a_few_connections_at_once_and_the_others_wait(monkeypatch):
    # the drop and the turn wait longer than this test, however slow the machine
    monkeypatch.setattr(chat, "PING_TIMEOUT", 120)
    monkeypatch.setattr(voices, "CATCH_UP_WAIT", 120)
    turns = voices.CATCHING_UP_PER_ADDRESS
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(running_servers(history=2000))
        seed_big(2000)
        stack.enter_context(resumes_that_never_read(servers, turns, "127.0.0.2"))
        wait_until(lambda: clients_waited_for(servers) == turns, what="the server waiting for them")
        one_more = stack.enter_context(
            connect(
                ws_url(servers, since=0),
                open_timeout=5,
                max_queue=None,
                source_address=("127.0.0.2", 0),
            )
        )
        # Another address catches up meanwhile, whole: 2,000 messages of 8 KB
        with connect(
            ws_url(servers, since=0),
            open_timeout=5,
            max_queue=None,
            source_address=("127.0.0.3", 0),
        ) as other:
            assert len(receive_history(other)["messages"]) == 2000
        with pytest.raises(TimeoutError):  # the fifth of one address waits for a turn
            one_more.recv(timeout=0)
        assert sum(kernel_send_queues(servers)["127.0.0.2"]) <= turns * KERNEL_SHARE
        stack.close()


@pytest.mark.timeout(60)
def test_a_connection_that_waits_too_long_for_its_turn_is_closed_to_come_back(monkeypatch):
    monkeypatch.setattr(voices, "CATCH_UP_WAIT", 0.5)  # 20 s in real life
    turns = voices.CATCHING_UP_PER_ADDRESS
    with running_servers(history=2000) as servers:
        seed_big(2000)
        with resumes_that_never_read(servers, turns, "127.0.0.2"):
            wait_until(lambda: clients_waited_for(servers) == turns, what="the server waiting")
            url = ws_url(servers, since=0)
            one_more = connect(url, open_timeout=5, source_address=("127.0.0.2", 0))
            with one_more, pytest.raises(ConnectionClosedOK):  # closed, nothing sent before
                one_more.recv(timeout=5)


# --- What a dropped client leaves in the kernel -----------------------------------------


@pytest.mark.timeout(60)
def test_a_non_reader_dropped_for_its_queue_leaves_nothing_queued_in_the_kernel(server):
    big = {"type": "message", "id": 0, "name": "x", "text": "x" * 2000}

    async def flood_until_dropped():
        for _ in range(2000):  # 4 MB: past MAX_QUEUED and the kernel's buffer
            if "silent" not in the_room().clients.values():
                return True
            the_room().send_to_all(big)
            await asyncio.sleep(0)
        return False

    with contextlib.closing(silent_client(server.ws_port)):
        wait_until(lambda: "silent" in the_room().clients.values(), what="silent in the room")
        assert ask_room(flood_until_dropped()), "the non-reader was not dropped"
        assert unsent_in_closed_sockets(server.ws_port) == 0  # it was 256 KiB, for minutes


@pytest.mark.timeout(60)
def test_a_non_reader_dropped_for_its_pings_leaves_nothing_queued_in_the_kernel(monkeypatch):
    monkeypatch.setattr(chat, "PING_INTERVAL", 0.2)  # 20 s in real life; the mechanism is the same
    monkeypatch.setattr(chat, "PING_TIMEOUT", 0.3)
    with running_servers(history=50) as servers:
        seed_big(50)  # one piece of 400 KB: more than the kernel's buffer, less than MAX_QUEUED
        with resumes_that_never_read(servers, 1, "127.0.0.2"):
            wait_until(lambda: not kernel_send_queues(servers), what="the non-reader dropped")
            assert unsent_in_closed_sockets(servers.ws_port) == 0


# --- A handshake for a path that is no URL path ------------------------------------------


@pytest.fixture(params=[None, "the-room-key"], ids=["no-key", "key"])
def either_server(request):
    with running_servers(key=request.param) as servers:
        yield servers


@pytest.mark.parametrize("path", ["//[x", "http://[::1", "//[::1/", "//][", "//x]", "ws://[::1"])
def test_a_handshake_for_a_path_that_is_no_url_is_a_400_not_a_500(either_server, caplog, path):
    status, body = raw_handshake(either_server.ws_port, [("Host", "127.0.0.1")], path)
    assert status in (400, 404), body
    assert tracebacks(caplog) == []


@pytest.mark.timeout(120)
def test_fuzzed_handshake_paths_never_get_a_500_or_a_traceback(either_server, caplog):
    pieces = st.sampled_from(["/", "//", "[", "]", "::1", ":", "@", "?", "#", "%", "x", "chat"])
    paths = st.lists(pieces | st.text("/[]:@?#%=&.;x1", max_size=6), max_size=8).map("".join)

    @settings(max_examples=100, deadline=None, database=None)
    @given(st.sampled_from(["", "/", "http://", "ws://127.0.0.1"]), paths)
    def check(prefix, path):
        status, _ = raw_handshake(either_server.ws_port, [("Host", "127.0.0.1")], prefix + path)
        assert status < 500
        assert tracebacks(caplog) == []

    check()
    wait_for_health(either_server.port, clients=0)


# --- The event loop: asyncio's own, whatever hug found installed -------------------------

FAKE_UVLOOP = '''
"""Stands for uvloop, as `import hug` sees it: a policy whose loops are of another class."""
import asyncio


class Loop(asyncio.SelectorEventLoop):
    pass


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return Loop()
'''

WHICH_LOOP = """
import asyncio
import chat

servers = chat.Servers(chat.Settings(port=0, ws_port=0))
try:
    print(type(asyncio.get_event_loop_policy()).__module__)  # what hug set
    print(type(servers.loop).__module__, type(servers.loop).__name__)  # what the chat runs on
finally:
    servers.stop()
"""


@pytest.mark.timeout(60)
def test_the_chat_runs_on_asyncios_own_loop_when_uvloop_can_be_imported(tmp_path):
    (tmp_path / "uvloop.py").write_text(FAKE_UVLOOP)
    run = subprocess.run(
        [sys.executable, "-c", WHICH_LOOP],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    policy, loop = run.stdout.splitlines()
    assert policy == "uvloop"  # hug found the fake and set its policy, as it would uvloop's
    assert loop.split()[0] in ("asyncio.unix_events", "asyncio.windows_events")


# --- One voice per person on a LAN, IPv6 and IPv4 alike ----------------------------------
#
# Two network namespaces of the test's own, joined by a veth pair: the chat's machine
# (fd00:ca7::1/64 and 192.0.2.1/24 on its link) and a LAN with laptops on that link, plus a
# stranger's /64 (fd00:beef::/64) that the chat reaches only through a router.

LAN_V6 = ["fd00:ca7::2", "fd00:ca7::3", "fd00:ca7::4"]  # three laptops on the chat's link
LAN_V4 = ["192.0.2.2", "192.0.2.3"]
NAMES = ["fd00:ca7::5", "fd00:ca7::6"]  # one holds a name, the other tries to take it
STRANGER = ["fd00:beef::1", "fd00:beef::2", "fd00:beef::3"]  # one machine, three addresses
ROUTER = "fd00:ca7::fe"  # the LAN's address through which the chat reaches the stranger


def ip(*args, netns=None):
    command = ["ip", *(["-n", netns] if netns else []), *args]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=10)


def skip_unless_ci(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: this test must run)")
    pytest.skip(reason)


@pytest.fixture
def lan():
    """The names of the two namespaces: (the chat's machine, the LAN)."""
    if shutil.which("ip") is None:
        skip_unless_ci("needs iproute2's ip to make network namespaces")
    if os.geteuid() != 0:
        skip_unless_ci("needs root to make network namespaces (ip netns add)")
    server, others = f"chat-srv-{os.getpid()}", f"chat-lan-{os.getpid()}"
    try:
        ip("netns", "add", server)
    except subprocess.CalledProcessError as error:
        skip_unless_ci(f"cannot make a network namespace: {error.stderr.strip()}")
    try:
        ip("netns", "add", others)
        ip(
            "link",
            "add",
            "v-srv",
            "netns",
            server,
            "type",
            "veth",
            "peer",
            "v-lan",
            "netns",
            others,
        )
        for netns, link in ((server, "v-srv"), (others, "v-lan")):
            ip("link", "set", "lo", "up", netns=netns)
            ip("link", "set", link, "up", netns=netns)
        ip("addr", "add", "fd00:ca7::1/64", "dev", "v-srv", "nodad", netns=server)
        ip("addr", "add", "192.0.2.1/24", "dev", "v-srv", netns=server)
        ip("route", "add", "fd00:beef::/64", "via", ROUTER, netns=server)
        for address in [*LAN_V6, *NAMES, ROUTER]:
            ip("addr", "add", f"{address}/64", "dev", "v-lan", "nodad", netns=others)
        for address in LAN_V4:
            ip("addr", "add", f"{address}/24", "dev", "v-lan", netns=others)
        for address in STRANGER:
            ip("addr", "add", f"{address}/64", "dev", "lo", "nodad", netns=others)
        yield server, others
    finally:
        for netns in (server, others):  # the veth pair goes with them
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "del", netns)


# The chat, with its rate limit's refill slowed to one message in 1000 s: each voice gets
# its burst of 20 and no more, however slow the machine.
CHAT_WITHOUT_REFILL = "import sys, chat; chat.PER_SECOND = 0.001; sys.exit(chat.main(sys.argv[1:]))"

LAN_CLIENTS = """
import http.client, json, sys
from websockets.sync.client import connect

server, port, ws_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
groups = json.loads(sys.argv[4])


def posted(source, name, count):
    stored = 0
    for n in range(count):
        connection = http.client.HTTPConnection(server, port, 10, source_address=(source, 0))
        body = json.dumps({"name": name, "text": f"{name} {n}"})
        connection.request("POST", "/messages", body, {"Content-Type": "application/json"})
        stored += connection.getresponse().status == 201
        connection.close()
    return stored


result = {}
for group, sources in groups.items():
    if group == "alice":  # the first holds "alice" over a websocket, the second posts as alice
        url = f"ws://[{server}]:{ws_port}/?name=alice"
        with connect(url, open_timeout=5, source_address=(sources[0], 0)) as ws:
            assert json.loads(ws.recv(timeout=5))["name"] == "alice"
            result[group] = posted(sources[1], "alice", 1)
    else:  # each source posts 20 at once: a burst
        result[group] = [posted(source, f"{group}-{n}", 20) for n, source in enumerate(sources)]
print(json.dumps(result))
"""


def chat_on_the_lan(lan, host, server, groups):
    """Start the chat in the chat's namespace on `host`; run LAN_CLIENTS from the LAN
    against `server` with `groups` of source addresses; their results."""
    server_netns, lan_netns = lan
    chat_process = subprocess.Popen(
        ["ip", "netns", "exec", server_netns, sys.executable, "-c", CHAT_WITHOUT_REFILL]
        + ["--host", host, "--port", "0", "--ws-port", "0", "--no-key"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        page, websocket = chat_process.stdout.readline(), chat_process.stdout.readline()
        assert page.startswith("Chat page:"), chat_process.stderr.read()
        port, ws_port = (line.rsplit(":", 1)[1].strip("/\n") for line in (page, websocket))
        clients = subprocess.run(
            ["ip", "netns", "exec", lan_netns, sys.executable, "-c", LAN_CLIENTS]
            + [server, port, ws_port, json.dumps(groups)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert clients.returncode == 0, clients.stderr
        return json.loads(clients.stdout)
    finally:
        chat_process.kill()
        chat_process.wait(10)
        chat_process.stdout.close()
        chat_process.stderr.close()


@pytest.mark.timeout(90)
def test_on_a_lan_each_laptop_is_one_voice_and_a_strangers_64_is_one(lan):
    groups = {"laptops": LAN_V6, "stranger": STRANGER, "alice": NAMES}
    result = chat_on_the_lan(lan, "::", "fd00:ca7::1", groups)
    assert result["laptops"] == [20, 20, 20]  # each laptop its own burst: it was 20 of 60
    assert sum(result["stranger"]) == 20  # three addresses of one /64: one burst
    assert result["alice"] == 0  # another laptop cannot post as alice while she is online
    result = chat_on_the_lan(lan, "0.0.0.0", "192.0.2.1", {"laptops": LAN_V4})
    assert result["laptops"] == [20, 20]  # IPv4 alike
