"""A room near its limits: a history bigger than the write buffer, a full room, the
process's file descriptors.
"""

import contextlib
import http.client
import json
import socket
from pathlib import Path

import chat

# isort: split
import pytest
import websockets
from websockets.sync.client import connect

from tests.helpers import (
    get,
    joined,
    request,
    running_servers,
    seed_big,
    wait_for_health,
    wait_until,
    ws_url,
)


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


def test_a_full_room_refuses_the_handshake_with_503_and_http_still_answers():
    with running_servers(max_clients=3) as servers, contextlib.ExitStack() as stack:
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
