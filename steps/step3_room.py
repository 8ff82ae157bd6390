"""Step 3: the room: step 2 plus what it remembers and tells, in JSON frames: the history on
joining, each message with an id, a time and a name, and who is online (presence)."""

import argparse
import asyncio
import datetime
import json
import urllib.parse

from websockets.asyncio.server import broadcast, serve


class Room:
    """Everything the chat remembers. Only the loop's thread calls it, and nothing in it awaits."""

    def __init__(self):
        self.messages = []
        self.guests = 0
        self.clients = {}  # connection -> name

    def post(self, name, text):
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        message = {"type": "message", "id": len(self.messages) + 1, "name": name, "text": text}
        message["ts"] = now.replace("+00:00", "Z")
        self.messages.append(message)
        self.send_to_all(message)
        return message

    def send_to_all(self, frame):
        """Encode once, write to everyone without waiting for any of them."""
        broadcast(self.clients, json.dumps(frame))

    def join(self, connection, name):
        """Send the history, then count the connection in: no message can fall in between."""
        online = list(self.clients.values())
        history = {"type": "history", "name": name, "messages": self.messages, "online": online}
        broadcast([connection], json.dumps(history))
        self.clients[connection] = name
        self.presence_changed(joined=name)

    def leave(self, connection):
        self.presence_changed(left=self.clients.pop(connection))

    def rename(self, connection, name):
        old, self.clients[connection] = self.clients[connection], name
        self.presence_changed(renamed={"from": old, "to": name})

    def presence_changed(self, **change):
        self.send_to_all({"type": "presence", **change, "changes": [change]})

    def guest_name(self):
        self.guests += 1
        return f"guest-{self.guests}"


room = Room()


async def chat(connection):
    """One client in the room: history first, then its frames until it goes."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(connection.request.path).query)
    room.join(connection, query["name"][0] if "name" in query else room.guest_name())
    try:
        async for frame in connection:
            handle_frame(connection, read_frame(frame))
    finally:
        room.leave(connection)


def read_frame(frame):
    """A frame as a dict; a frame that is not a JSON object is a message's text."""
    try:
        data = json.loads(frame)
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {"type": "message", "text": frame}


def handle_frame(connection, data):
    """Act on one frame; an answer to this client alone goes, like its history, by broadcast()."""
    if data.get("type") == "message":
        room.post(room.clients[connection], data.get("text"))
    elif data.get("type") == "name":
        room.rename(connection, data.get("name"))
    else:
        broadcast([connection], json.dumps({"type": "error", "error": "unknown type"}))


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
