"""Step 4's exercise, solved: a hug route that asks the room. GET /online answers who is in
the room, {"online": ["alice", "bob"]}: the route asks the loop, as POST /messages does."""

import argparse
import asyncio
import datetime
import json
import sys
import threading
import urllib.parse
from pathlib import Path

sys.modules.setdefault("numpy", None)  # hug 2.6.1 fails to import beside NumPy 2, and needs none
import hug
import waitress
from websockets.asyncio.server import broadcast, serve

PAGE = Path(__file__).parent.parent / "chat.html"  # the real page, beside steps/


class Room:
    """Everything the chat remembers. Only the loop's thread calls it, and nothing in it awaits."""

    def __init__(self):
        self.messages = []
        self.guests = 0
        self.clients = {}  # connection -> name

    def post(self, name, text, ref=None):
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        message = {"type": "message", "id": len(self.messages) + 1, "name": name, "text": text}
        message["ts"] = now.replace("+00:00", "Z")
        if ref is not None:  # the page's own id for it: how the page knows its message came back
            message["ref"] = ref
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

    async def who_is_online(self):
        """GET /online: a coroutine, so that ask_room() can hand it to the loop."""
        return sorted(self.clients.values())


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
        room.post(room.clients[connection], data.get("text"), data.get("ref"))
    elif data.get("type") == "name":
        room.rename(connection, data.get("name"))
    elif data.get("type") == "ping":  # the page's heartbeat: no answer, and it reconnects
        broadcast([connection], json.dumps({"type": "pong"}))
    else:
        broadcast([connection], json.dumps({"type": "error", "error": "unknown type"}))


# The HTTP routes: hug, in waitress's threads. They never touch the room: they ask the loop.

api = hug.API(__name__)


def ask_room(coroutine):
    """Run a coroutine on the room's event loop; this thread waits for the answer."""
    return asyncio.run_coroutine_threadsafe(coroutine, servers.loop).result()


@hug.post("/messages", api=api, status=hug.HTTP_201)
def post_message(text: hug.types.text, name: hug.types.text = None, ref: hug.types.text = None):
    return ask_room(post_in_room(name, text, ref))


async def post_in_room(name, text, ref):
    """Runs on the loop: even a guest number is the room's to give."""
    return room.post(name or room.guest_name(), text, ref)


@hug.get("/online", api=api)
def online():
    return {"online": ask_room(room.who_is_online())}


@hug.get("/config", api=api)
def config():
    return {"ws_port": servers.ws_port}


@hug.get("/", api=api, output=hug.output_format.html)
def page():
    return PAGE.read_text(encoding="utf-8")


class Servers:
    """The websocket server on the room's loop, in this thread; waitress in a thread of its own."""

    async def run(self, port, ws_port):
        self.loop = asyncio.get_running_loop()  # the room's: ask_room() hands coroutines to it
        http_server = waitress.create_server(api.http.server(), host="127.0.0.1", port=port)
        async with serve(chat, "127.0.0.1", ws_port) as ws_server:
            self.ws_port = ws_server.sockets[0].getsockname()[1]
            print(f"Chat page:  http://127.0.0.1:{http_server.effective_port}/", flush=True)
            print(f"Websocket:  ws://127.0.0.1:{self.ws_port}/", flush=True)
            # a daemon: it ends with the process, after Ctrl+C has stopped the loop
            threading.Thread(target=http_server.run, daemon=True).start()
            await ws_server.serve_forever()


servers = Servers()

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000, help="HTTP port, 0 for any free one")
    parser.add_argument("--ws-port", type=int, default=8765, help="0 for any free port")
    args = parser.parse_args()
    try:
        asyncio.run(servers.run(args.port, args.ws_port))
    except KeyboardInterrupt:  # Ctrl+C: stop, without a traceback
        pass
    except OSError as error:  # the port is taken (another step still runs?): one line, exit 2
        where = f"cannot listen on port {args.port} or {args.ws_port}"
        parser.exit(2, f"{parser.prog}: error: {where}: {error.strerror}\n")
