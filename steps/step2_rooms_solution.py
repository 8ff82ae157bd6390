"""Step 2's exercise, solved: rooms by path. ws://127.0.0.1:8765/kitchen and /garden are two
rooms: each frame goes to everyone in its own room, and nobody else."""

import argparse
import asyncio
import urllib.parse

from websockets.asyncio.server import broadcast, serve


class Room:
    """Everyone connected. Only the event loop's thread calls it, and nothing in it awaits."""

    def __init__(self):
        self.clients = set()

    def join(self, connection):
        self.clients.add(connection)

    def leave(self, connection):
        self.clients.remove(connection)

    def send_to_all(self, frame):
        """Write to every connection without waiting for any of them."""
        broadcast(self.clients, frame)


rooms = {}  # path -> Room, made when its first client comes


async def chat(connection):
    """One client in the room its path names: its frames go to everyone there, until it goes."""
    path = urllib.parse.urlsplit(connection.request.path).path
    room = rooms.setdefault(path, Room())
    room.join(connection)
    try:
        async for frame in connection:
            room.send_to_all(frame)
    finally:
        room.leave(connection)


async def main(ws_port):
    async with serve(chat, "127.0.0.1", ws_port) as server:
        print(f"Websocket:  ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--ws-port", type=int, default=8765, help="0 for any free port")
    args = parser.parse_args()
    try:
        asyncio.run(main(args.ws_port))
    except KeyboardInterrupt:  # Ctrl+C: stop, without a traceback
        pass
    except OSError as error:  # the port is taken (another step still runs?): one line, exit 2
        where = f"cannot listen on port {args.ws_port}"
        parser.exit(2, f"{parser.prog}: error: {where}: {error.strerror}\n")
