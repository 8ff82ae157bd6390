"""Prepared frames: one serialized frame written to everyone. The slow-reader guard rides on the
same transport.write(): see test_slow_clients.py.
"""

import asyncio
import base64
import json
import os

from parts import sending

# isort: split
from websockets.asyncio.server import serve

from tests.helpers import ask_room, get, joined, post, receive, run_async, silent_client, the_room


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
    return next(connection for connection, who in the_room().clients.items() if who == name)


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
        go_on, sent = ask_room(start_fragmented_send())
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
            sending.send_prepared(
                [await connected], json.dumps({"type": "message", "text": "x" * 1000})
            )
            head = await reader.readexactly(2)
            writer.close()
        return head

    head = run_async(asyncio.wait_for(scenario(), 10))
    assert head[0] & 0x40, "RSV1 is not set: the frame was not compressed"
    assert head[1] & 0x7F < 126, "1000 bytes of x compress to a few"
