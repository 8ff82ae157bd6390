"""Step 2: a chat room on websockets alone: step 1 plus a Room, which sends the history on
connect, each message to everyone (the sender too), joins and leaves, in chat.py's JSON frames.

Left out: HTTP and the page (step 3); in chat.py: resuming with since= (Room.join()), the rules
for texts and names (clean_text()), rate limits (TokenBucket), slow readers (ChatConnection)."""

import argparse
import asyncio
import contextlib
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
        broadcast(self.clients, json.dumps(message))
        return message

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
        broadcast(self.clients, json.dumps({"type": "presence", **change, "changes": [change]}))

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
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: stop, without a traceback
        asyncio.run(main(parser.parse_args().ws_port))
