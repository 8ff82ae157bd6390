"""What one HTTP client can hold: never a worker thread, never every connection.

Against the real chat: in this process where waitress's own state is the event to wait
for, as `python chat.py` where a signal is what is tested. Source addresses are loopback
addresses (127.0.0.0/8 is all this machine): a socket binds one before it connects.
"""

import contextlib
import fcntl
import gc
import json
import re
import signal
import socket
import struct
import termios
import threading
import time

import pytest

from parts import http_server
from tests.helpers import (
    ChatProcess,
    ask_room,
    request,
    running_servers,
    the_room,
    tracebacks,
    unsent_in_closed_sockets,
    wait_until,
)

BIG = "\U0001f600" * 2000  # the longest text, of 4-byte characters: 8 KB of JSON
PIPELINED = 60  # requests each non-reader sends at once: 48 MB of answers, 3 times what
# waitress buffers for a connection (16 MiB) before its worker waits for the client


def pipelining_non_reader(port, source, count=PIPELINED):
    """A connection from `source` that sends `count` GET /messages?limit=1000 in one write and
    then reads nothing."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    one = f"GET /messages?limit=1000 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    sock.sendall(one * count)
    return sock


def waiting_bytes(sock):
    """How many bytes the kernel holds for `sock` to read (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0]


def unsent_bytes(sock):
    """How many bytes the kernel holds for `sock` to send (TIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def wait_until_the_server_sends_no_more(socks, timeout=30):
    """Waits until nothing more arrives for the non-readers `socks`: the server has sent what
    the kernel takes, and stopped (with a fix) or stalled (without).

    Nothing the server does when it stops sending can be seen from outside, so this waits
    for the bytes that arrived to stay the same for half a second, after at least one
    answer each began to arrive.
    """
    deadline, last, still_since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        now = [waiting_bytes(sock) for sock in socks]
        if now != last:
            last, still_since = now, time.monotonic()
        elif all(now) and time.monotonic() - still_since > 0.5:
            return
        time.sleep(0.05)
    raise AssertionError(f"the non-readers were still being sent to after {timeout} s: {last}")


def workers_idle(servers):
    """waitress's worker threads are all waiting for work, and none is queued."""
    dispatcher = servers.http_server.task_dispatcher
    with dispatcher.lock:
        return dispatcher.active_count == 0 and not dispatcher.queue


def post_big_messages(port, count):
    """`count` messages of the longest text over HTTP, from as many addresses as the rate
    limit needs (20 at once from each)."""
    for n in range(count):
        status, _, _ = request(
            port, "POST", "/messages", {"text": BIG}, source=f"127.0.1.{1 + n // 20}"
        )
        assert status == 201


@contextlib.contextmanager
def closing_all(socks):
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


# --- Clients that send many requests and read no answer --------------------------------


def test_pipelining_clients_that_never_read_hold_no_worker_and_others_are_served():
    with running_servers(history=1000) as servers:
        post_big_messages(servers.port, 100)
        one_answer = len(request(servers.port, "GET", "/messages?limit=1000").body)
        sources = [f"127.0.0.{10 + n}" for n in range(4)]  # as many as waitress has workers
        with closing_all([pipelining_non_reader(servers.port, s) for s in sources]) as socks:
            wait_until_the_server_sends_no_more(socks)

            started = time.monotonic()
            status, _, body = request(servers.port, "GET", "/health", source="127.0.0.2")
            assert status == 200 and json.loads(body)["messages"] == 100
            status, _, body = request(
                servers.port, "GET", "/messages?limit=1000", source="127.0.0.3"
            )
            assert status == 200 and len(json.loads(body)["messages"]) == 100
            assert time.monotonic() - started < 5

            # No worker waits for a non-reader (each did, and nobody else got an answer).
            wait_until(lambda: workers_idle(servers), what="every worker free")
            # What the server holds for each: one answer at most, not 60 (48 MB), and what
            # the kernel holds to send them is SEND_BUFFER's, not its 4 MB.
            channels = [
                channel
                for channel in list(servers.http_server.active_channels.values())
                if channel.addr[0] in sources
            ]
            assert len(channels) == 4
            assert max(channel.total_outbufs_len for channel in channels) <= one_answer + 1024
            in_kernel = max(unsent_bytes(channel.socket) for channel in channels)
            assert 0 < in_kernel <= 2 * http_server.SEND_BUFFER


def test_pipelined_requests_of_a_client_that_reads_are_all_answered_in_order():
    with (
        running_servers() as servers,
        socket.create_connection(("127.0.0.1", servers.port)) as sock,
    ):
        sock.settimeout(10)
        body = json.dumps({"text": "pipelined"}).encode()
        head = f"Host: 127.0.0.1:{servers.port}\r\n"
        sock.sendall(
            f"GET /health HTTP/1.1\r\n{head}\r\n".encode()
            + f"POST /messages HTTP/1.1\r\n{head}Content-Type: application/json\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
            + f"\r\nGET /messages HTTP/1.1\r\n{head}\r\n".encode()  # a blank line between
            + f"GET /nowhere HTTP/1.1\r\n{head}\r\n".encode()
            + f"GET /config HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode()
        )
        answers = b""
        while chunk := sock.recv(65536):
            answers += chunk
        statuses = re.findall(rb"HTTP/1\.1 (\d\d\d) ", answers)
        assert statuses == [b"200", b"201", b"200", b"404", b"200"]
        assert b'"text": "pipelined"' in answers.split(b"HTTP/1.1 200")[2]


def test_the_longest_answer_stays_below_where_a_worker_would_wait_for_its_client():
    with running_servers(history=1000) as servers:
        longest = {"name": "\U0001f600" * 32, "text": "\x01" * 2000}  # \u0001: 6 bytes each
        for n in range(1000):
            status, _, _ = request(
                servers.port, "POST", "/messages", longest, source=f"127.0.1.{1 + n // 20}"
            )
            assert status == 201
        answer = request(servers.port, "GET", "/messages?limit=1000").body
        assert 12_000_000 < len(answer) < servers.http_server.adj.outbuf_high_watermark


def test_a_connection_that_reads_nothing_is_reset_after_the_idle_timeout_leaving_nothing_queued():
    with running_servers() as servers:
        post_big_messages(servers.port, 100)
        waitress_settings = servers.http_server.adj  # 30 s and every 5 s in real life
        waitress_settings.channel_timeout = waitress_settings.cleanup_interval = 1
        with closing_all([pipelining_non_reader(servers.port, "127.0.0.10")]) as (sock,):
            wait_until_the_server_sends_no_more([sock])
            wait_until(
                lambda: not servers.http_server.active_channels,
                timeout=10,
                what="the non-reader closed by the server",
            )
            # Reset, not closed: the kernel keeps none of its unsent answers for minutes.
            assert unsent_in_closed_sockets(servers.port) == 0
            with pytest.raises(ConnectionResetError):
                while sock.recv(1 << 20):
                    pass


@pytest.mark.parametrize("store", [False, True], ids=["in-memory", "--store"])
def test_sigterm_with_pipelining_non_readers_connected_exits_within_5_s(tmp_path, store):
    args = ["--store", str(tmp_path / "room.db")] if store else []
    with chat_process("--port", "0", "--ws-port", "0", *args) as process:
        stop_with_non_readers_connected(process)


def stop_with_non_readers_connected(process):
    process.urls()
    post_big_messages(process.port, 100)
    sources = [f"127.0.0.{10 + n}" for n in range(4)]
    with closing_all([pipelining_non_reader(process.port, s) for s in sources]) as socks:
        wait_until_the_server_sends_no_more(socks)
        started = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(10) == 0
        assert time.monotonic() - started < 5
    assert "still running" not in process.process.stderr.read()


@contextlib.contextmanager
def chat_process(*args):
    process = ChatProcess(*args)
    try:
        yield process
    finally:
        process.stop()


@pytest.mark.filterwarnings(
    # waitress's temporary file of an answer a worker was still writing when its connection
    # closed is closed only by the garbage collector: a symptom of the same cause
    "ignore::pytest.PytestUnraisableExceptionWarning"
)
@pytest.mark.timeout(120)
def test_what_one_address_of_non_readers_holds_in_answers_is_bounded():
    bound = 64 * 1024 * 1024

    with running_servers(history=1000) as servers:
        ask_room(longest_history())
        held = []
        try:
            held += non_readers_of_the_longest_answer(servers.port, "127.0.0.40", 100)

            def held_for_them():
                channels = list(servers.http_server.active_channels.values())
                return sum(c.total_outbufs_len for c in channels if c.addr[0] == "127.0.0.40")

            samples = []

            def past_the_bound_or_settled():
                """Past the bound, or the same for 1.5 s with every worker idle."""
                samples.append(held_for_them())
                time.sleep(0.5)
                settled = len(samples) > 3 and len(set(samples[-3:])) == 1 and samples[-1] > 0
                return samples[-1] > bound or (settled and workers_idle(servers))

            wait_until(past_the_bound_or_settled, timeout=60, what="the answers held")
            assert held_for_them() <= bound
        finally:
            for sock in held:
                sock.close()
            wait_until(lambda: workers_idle(servers), timeout=60, what="the workers done")
            gc.collect()  # the leaked temporary files, here where their warning is ignored


async def longest_history():
    """1000 messages of the longest JSON: U+0001 is 6 bytes, 12 KB a message."""
    for _ in range(1000):
        await the_room().post("big", "\u0001" * 2000)


def non_readers_of_the_longest_answer(port, source, count):
    """`count` connections from `source` that each ask GET /messages?limit=1000, read nothing."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /messages?limit=1000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        socks.append(sock)
    return socks


@pytest.mark.filterwarnings(
    # waitress's temporary file of an answer a worker was still writing when its connection
    # closed is closed only by the garbage collector: a symptom of the same cause
    "ignore::pytest.PytestUnraisableExceptionWarning"
)
@pytest.mark.timeout(60)
def test_stopping_while_workers_write_answers_logs_no_traceback(caplog):
    with running_servers(history=1000) as servers:
        ask_room(longest_history())
        # from 20 addresses, 2 each: one address gets only two answers written at a time, so
        # 40 answers of 12 MB keep the workers writing while the test stops the servers
        held = [
            sock
            for n in range(20)
            for sock in non_readers_of_the_longest_answer(servers.port, f"127.0.0.{41 + n}", 2)
        ]
        try:
            wait_until(lambda: not workers_idle(servers), what="a worker answering")
            servers.stop()
        finally:
            for sock in held:
                sock.close()
    found = tracebacks(caplog)
    caplog.clear()  # its records hold the tracebacks, which hold the leaked temporary files
    gc.collect()  # so they are closed here, where their warning is ignored
    assert not found


# --- Connections per client address ---------------------------------------------------


def connected_from(port, source, count):
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(5)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks


def answers(sock, port):
    """Whether an open connection `sock` is served: GET /health on it."""
    sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    return sock.recv(1024).startswith(b"HTTP/1.1 200 OK")


def closed_by_server(sock):
    """Whether the server closes `sock` within its timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_one_address_gets_100_http_connections_and_others_are_still_served():
    with (
        running_servers() as servers,
        closing_all(connected_from(servers.port, "127.0.0.5", 100)) as held,
    ):
        # Accepted in order: once the 101st is dealt with, the 100 before it are in.
        with closing_all(connected_from(servers.port, "127.0.0.5", 1)) as (past_the_cap,):
            assert closed_by_server(past_the_cap)
        assert answers(held[0], servers.port) and answers(held[-1], servers.port)
        assert request(servers.port, "GET", "/health", source="127.0.0.6").status == 200

        held.pop().close()  # one place free again: that address gets it

        def one_more_is_served():  # once the server has seen that one close
            with closing_all(connected_from(servers.port, "127.0.0.5", 1)) as (sock,):
                try:
                    return answers(sock, servers.port)
                except ConnectionResetError:
                    return False

        wait_until(one_more_is_served, what="a connection served once one closed")


def test_behind_the_proxy_its_connections_are_not_capped_per_address():
    # Every client comes from the proxy on 127.0.0.1; nginx keeps the limits per client.
    with (
        running_servers(public_url="https://chat.example.org", key="k" * 16) as servers,
        closing_all(connected_from(servers.port, "127.0.0.1", 150)) as held,
    ):
        assert all(answers(sock, servers.port) for sock in held[-50:])


@pytest.mark.timeout(120)
def test_idle_connections_from_ten_addresses_leave_health_answering():
    process = ChatProcess("--port", "0", "--ws-port", "0")
    held = []
    try:
        process.urls()
        for address in range(10):
            for _ in range(100):
                sock = socket.socket()
                sock.bind((f"127.0.13.{address + 1}", 0))
                sock.connect(("127.0.0.1", process.port))
                held.append(sock)
        answer = {}

        def health():
            try:
                answer["status"] = request(process.port, "GET", "/health", source="127.0.0.99")
            except OSError as error:  # a timeout: nobody accepted the connection
                answer["status"] = error

        thread = threading.Thread(target=health, daemon=True)
        thread.start()
        thread.join(12)
        assert getattr(answer.get("status"), "status", answer.get("status")) == 200
    finally:
        for sock in held:
            sock.close()
        process.stop()
