"""The websocket server's sockets: what a connection may hold in the kernel, whose voice an
address is on a LAN, handshakes for paths that are no URL, and the event loop it runs on."""

import asyncio
import base64
import contextlib
import os
import socket
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chat
from test_chat import (
    CHAT_PY,
    connect,
    raw_handshake,
    receive_history,
    running_servers,
    seed_big,
    tracebacks,
    wait_for_health,
    wait_until,
    ws_url,
)

ROOT = CHAT_PY.parent


# --- What one connection, and one address, may hold in flight ---------------------------

fcntl = pytest.importorskip("fcntl", reason="the kernel's send queues are read with ioctl (Unix)")
termios = pytest.importorskip("termios", reason="the kernel's send queues are read with ioctl")


# What the kernel may hold for one connection: twice SO_SNDBUF, and it may go past that by the
# one packet it was filling (up to 64 KB on loopback)
KERNEL_SHARE = 2 * chat.SEND_BUFFER + 64 * 1024


def kernel_send_queues(servers):
    """Bytes the kernel holds for each websocket connection, not yet taken by its client
    (TIOCOUTQ, which is SIOCOUTQ for a socket), by client address."""

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


@pytest.fixture
def big_room():
    """2,000 messages of 8 KB kept: 16 MB, more than the kernel takes for one socket."""
    with running_servers(history=2000) as servers:
        seed_big(2000)
        yield servers


def test_a_client_that_resumes_and_never_reads_holds_a_bounded_kernel_buffer(big_room):
    with resumes_that_never_read(big_room, 1, "127.0.0.2"):
        wait_until(lambda: clients_waited_for(big_room) == 1, what="the server waiting for it")
        (unsent,) = kernel_send_queues(big_room)["127.0.0.2"]
    assert unsent <= KERNEL_SHARE  # it was 4 MB, the kernel's maximum here


@pytest.mark.timeout(60)
def test_one_address_catches_up_on_a_few_connections_at_once_and_the_others_wait(big_room):
    turns = chat.CATCHING_UP_PER_ADDRESS
    with contextlib.ExitStack() as stack:
        stack.enter_context(resumes_that_never_read(big_room, turns, "127.0.0.2"))
        wait_until(
            lambda: clients_waited_for(big_room) == turns, what="the server waiting for them"
        )
        one_more = stack.enter_context(
            connect(
                ws_url(big_room, since=0),
                open_timeout=5,
                max_queue=None,
                source_address=("127.0.0.2", 0),
            )
        )
        # Another address catches up meanwhile, whole: 2,000 messages of 8 KB
        with connect(
            ws_url(big_room, since=0),
            open_timeout=5,
            max_queue=None,
            source_address=("127.0.0.3", 0),
        ) as other:
            assert len(receive_history(other)["messages"]) == 2000
        with pytest.raises(TimeoutError):  # the fifth of one address waits for a turn
            one_more.recv(timeout=0)
        assert sum(kernel_send_queues(big_room)["127.0.0.2"]) <= turns * KERNEL_SHARE
        stack.close()


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

servers = chat.Servers("127.0.0.1", 0, 0)
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
