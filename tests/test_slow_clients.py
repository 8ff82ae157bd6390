"""Clients that are slow or silent: a reader that stops reading is dropped and the others get
everything, a resuming client that reads slowly is waited for, and connections that never
handshake or trickle cannot lock others out.
"""

import asyncio
import socket

import chat

# isort: split

from tests.helpers import (
    ask_room,
    get,
    joined,
    post,
    receive,
    receive_history,
    receive_until,
    request,
    running_servers,
    seed_big,
    silent_client,
    stalled_resume,
    the_room,
    wait_for_health,
    wait_until,
)


def test_a_reader_that_stops_reading_is_dropped_and_the_others_get_everything(server):
    total, batch, text = 4000, 100, "x" * 2000  # 8 MB: past the kernel's buffers and our 1 MiB
    peak = [0]

    async def post_batch():
        for _ in range(batch):
            await the_room().post("bulk", text)
            peak[0] = max(
                peak[0], *(c.transport.get_write_buffer_size() for c in the_room().clients)
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
            ask_room(post_batch())
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


def server_connections(servers):
    async def count():
        return len(servers.ws_server.all_connections)

    return asyncio.run_coroutine_threadsafe(count(), servers.loop).result(5)


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
        for n in range(300):  # from 3 addresses: one may hold 100 HTTP connections
            sock = socket.create_connection(
                ("127.0.0.1", server.port), timeout=5, source_address=(f"127.0.0.{10 + n % 3}", 0)
            )
            if n % 3 == 0:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a request that trickles in
            idle.append(sock)
        assert request(server.port, "GET", "/")[0] == 200
        assert post(server.port, "/messages", {"text": "still posting"})[0] == 201
    finally:
        for sock in idle:
            sock.close()
