"""A real-time chat in one module: hug's HTTP routes and a websockets room in one process.

    python chat.py            then open http://127.0.0.1:8000/

Two servers share this process. The asyncio event loop runs the websocket server in
one thread and owns the room: the history, the id counter and the connections. hug's
HTTP routes run in waitress's worker threads; they never touch the room themselves,
they hand their work to the event loop and wait for the answer. One owner means one
order: every client sees the same messages, in the same order, as GET /messages.

Read it top to bottom: configuration, the room, the websocket handlers, the HTTP
routes, start-up and shutdown, main(). The contract is in the README.
"""

import argparse
import asyncio
import base64
import collections
import datetime
import hashlib
import http
import json
import re
import secrets
import signal
import sys
import threading
import time
import unicodedata
import urllib.parse
import webbrowser
from pathlib import Path

# hug 2.6.1 uses NumPy when it can import it, and then a name that NumPy 2 removed
# (np.unicode_): `import hug` fails. The chat needs no NumPy: hide it while hug loads.
sys.modules.setdefault("numpy", None)
import hug  # noqa: E402

if sys.modules["numpy"] is None:
    del sys.modules["numpy"]  # and let any other code import it as usual
import waitress
import waitress.wasyncore
from falcon.util.uri import parse_query_string
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosedError

# --- Configuration -------------------------------------------------------------------

PAGE = Path(__file__).with_name("chat.html")
MAX_TEXT = 2000  # characters, after trimming white space
MAX_NAME = 32
MAX_FRAME = 64 * 1024  # bytes; a bigger websocket frame closes the connection (1009)
MAX_BODY = 64 * 1024  # bytes; a bigger HTTP body is refused by waitress (413)
MAX_QUEUED = 1024 * 1024  # bytes waiting for a client that does not read; then it is dropped
PING_INTERVAL, PING_TIMEOUT = 20, 20  # seconds; a client that misses a pong is dropped
CLOSE_TIMEOUT = 2  # seconds to wait for a client's closing handshake; shutdown must take < 5
HISTORY_ON_CONNECT = 50
PRESENCE_EVERY = 0.25  # seconds; at most one presence frame this often (each lists everyone)
BURST, PER_SECOND = 20, 10  # rate limit of each websocket connection
HTTP_WAIT = 5  # seconds an HTTP handler waits for the event loop


class BadInput(ValueError):
    """A client sent something the contract does not allow; the message says the rule."""


class RoomUnavailable(Exception):
    """The room cannot store messages right now (with --redis: Redis is away)."""


class TooFast(BadInput):
    """More than BURST messages at once, or more than PER_SECOND a second for long."""

    def __init__(self):
        super().__init__("too many messages too fast: wait a second")


# --- The room --------------------------------------------------------------------------


def clean_text(value):
    """The text of a message; hug uses it as a type too, so HTTP and websocket agree."""
    return trimmed(value, "text", MAX_TEXT)


def clean_name(value):
    """A display name, with no control characters (a newline in the online list helps nobody)."""
    name = trimmed(value, "name", MAX_NAME)
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise BadInput("name has control characters")
    return name


def trimmed(value, field, limit):
    """A string of 1 to `limit` characters once white space is trimmed from its ends."""
    if not isinstance(value, str):
        raise BadInput(f"{field} must be a string")
    value = value.strip()
    if not value:
        raise BadInput(f"{field} is empty")
    if len(value) > limit:
        raise BadInput(f"{field} is longer than {limit} characters")
    try:
        value.encode("utf-8")  # JSON can carry a lone surrogate ("\ud800"); UTF-8 cannot
    except UnicodeEncodeError:
        raise BadInput(f"{field} is not valid Unicode") from None
    return value


def whole_number(text, low, high):
    """`text` as a whole number from `low` to `high`, else None.

    isdecimal() refuses "-1", "1.5" and "²" (isdigit() would pass "²" on to int()), and the
    length bound keeps int() away from its limit of 4300 digits.
    """
    if text.isdecimal() and len(text) <= len(str(high)) and low <= int(text) <= high:
        return int(text)
    return None


def utc_now():
    """An ISO 8601 UTC timestamp with milliseconds, e.g. 2026-11-23T14:05:09.123Z."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TokenBucket:
    """BURST messages at once, then PER_SECOND a second: a person never notices, a script does."""

    def __init__(self):
        self.tokens, self.last = BURST, time.monotonic()

    def take(self):
        now = time.monotonic()
        self.tokens = min(BURST, self.tokens + (now - self.last) * PER_SECOND)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Room:
    """Everything the chat remembers.

    Only the event loop's thread calls these methods, and none of them awaits: each
    runs from start to end without anything else happening in between. That is what
    makes the loop a safe owner, with no lock anywhere.
    """

    def __init__(self, history, loop, ws_port):
        self.loop = loop  # the one thread allowed in here; see ask_room()
        self.ws_port = ws_port
        self.id = secrets.token_hex(8)  # changes on restart, so clients know ids began again
        self.messages = collections.deque(maxlen=history)
        self.last_id = 0
        self.guests = 0
        self.clients = {}  # connection -> name
        self.presence_changes = []  # joins, leaves and renames not yet sent
        self.presence_sent = 0.0  # loop time of the last presence frame
        self.http_buckets = {}  # client address -> TokenBucket, for POST /messages

    def guest_name(self):
        self.guests += 1
        return f"guest-{self.guests}"

    async def post(self, name, text):
        """Store a message and send it to everyone; returns the stored message.

        It awaits nothing here. The Redis room (redis_room.py) stores it in Redis instead,
        and every process delivers it when Redis publishes it.
        """
        return self.deliver({"type": "message", "id": self.last_id + 1, "name": name, "text": text, "ts": utc_now()})

    def deliver(self, message):
        """Keep a message and send it to everyone connected here, in id order."""
        self.last_id = message["id"]
        self.messages.append(message)
        self.send_to_all(message)
        return message

    async def recent(self, since, limit):
        return self.messages_since(since, limit)

    def messages_since(self, since=None, limit=None):
        """Kept messages with an id greater than `since`, oldest first; the last 50 without it."""
        if since is None:
            return list(self.messages)[-HISTORY_ON_CONNECT:]
        newer = [m for m in self.messages if m["id"] > since]
        return newer[:limit]

    def join(self, connection, name, since):
        """Send the history, then count the connection in: no message can fall in between."""
        history = {"type": "history", "room": self.id, "name": name, "messages": self.messages_since(since)}
        broadcast([connection], json.dumps(history, ensure_ascii=False))
        self.clients[connection] = name
        self.presence_changed(joined=name)

    def leave(self, connection):
        name = self.clients.pop(connection)
        self.presence_changed(left=name)

    def rename(self, connection, name):
        old, self.clients[connection] = self.clients[connection], name
        self.presence_changed(renamed={"from": old, "to": name})

    def presence_changed(self, **change):
        """Send presence now, or with the next changes if a frame went out less than 0.25 s ago.

        Each frame lists everyone and goes to everyone: a frame per join would cost the
        square of the room's size each time, and filling a room of 1000 would take seconds.
        """
        self.presence_changes.append(change)
        if len(self.presence_changes) == 1:
            wait = self.presence_sent + PRESENCE_EVERY - self.loop.time()
            self.loop.call_later(max(0, wait), self.send_presence)

    def send_presence(self):
        changes, self.presence_changes = self.presence_changes, []
        self.presence_sent = self.loop.time()
        frame = {"type": "presence", "online": sorted(self.clients.values()), "changes": changes}
        if len(changes) == 1:
            frame.update(changes[0])  # one change: {"joined": "bob"}, as the contract shows
        self.send_to_all(frame)

    def send_to_all(self, frame):
        """Encode once, write to everyone without waiting (a client that stops reading is
        dropped by ChatConnection, so nobody waits for it)."""
        broadcast(self.clients, json.dumps(frame, ensure_ascii=False))

    def check_http_rate(self, address):
        """The same limit for HTTP posts as for a websocket, per client address."""
        if len(self.http_buckets) > 10_000:  # bounded: forgetting gives everyone a fresh burst
            self.http_buckets.clear()
        if not self.http_buckets.setdefault(address, TokenBucket()).take():
            raise TooFast()

    async def health(self):
        return {"status": "ok", "clients": len(self.clients), "messages": len(self.messages), "last_id": self.last_id}

    async def close(self):
        """Nothing to let go of here; the Redis room closes its connections."""


room = None  # the one Room of this process, made when the servers start


# --- The websocket handlers ------------------------------------------------------------


def parse_since(value):
    """`since` from a query string: None when absent, else a whole number of 0 or more."""
    if value is None:
        return None
    since = whole_number(value, 0, 10**100 - 1)  # any id a client could hold, and then some
    if since is None:
        raise BadInput("since must be a whole number of 0 or more")
    return since


class ChatConnection(ServerConnection):
    """A websocket connection that is dropped when MAX_QUEUED bytes wait to be sent to it.

    broadcast() never waits for a slow client, so its frames pile up in memory. asyncio
    calls pause_writing() when the write buffer passes its high-water mark (write_limit
    in serve() below): that client has stopped reading. Dropping it frees the buffer; it
    can come back with since=.
    """

    def pause_writing(self):
        super().pause_writing()
        self.transport.abort()


async def echo(connection):
    """The first workshop step: every frame goes straight back to its sender."""
    async for frame in connection:
        await connection.send(frame)


async def chat(connection):
    """One client in the room: history first, then its frames until it goes."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(connection.request.path).query)
    errors = []
    try:
        name = clean_name(query["name"][0]) if "name" in query else room.guest_name()
    except BadInput as error:
        name = room.guest_name()
        errors.append(str(error))
    try:
        since = parse_since(query.get("since", [None])[0])
    except BadInput as error:
        since = None
        errors.append(str(error))
    if query.get("room", [room.id])[0] != room.id:
        since = None  # ids began again in this room: the client's `since` means nothing here

    room.join(connection, name, since)
    try:
        for error in errors:
            await send_error(connection, error)
        bucket = TokenBucket()
        async for frame in connection:
            try:
                if not bucket.take():
                    raise TooFast()
                await handle_frame(connection, frame)
            except (BadInput, RoomUnavailable) as error:
                await send_error(connection, str(error))
    finally:
        room.leave(connection)


async def handle_frame(connection, frame):
    """Act on one frame from a client; a frame that is not a JSON object is a message's text."""
    if isinstance(frame, bytes):
        raise BadInput("binary frames are not accepted: send text")
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        await room.post(room.clients[connection], clean_text(frame))
    elif data.get("type") == "message":
        await room.post(room.clients[connection], clean_text(data.get("text")))
    elif data.get("type") == "name":
        room.rename(connection, clean_name(data.get("name")))
    else:
        raise BadInput(f"unknown type: {str(data.get('type'))[:40]!r} (use 'message' or 'name')")


async def send_error(connection, error):
    await connection.send(json.dumps({"type": "error", "error": error}))


async def route(connection):
    """The websocket server's one handler: the path picks the room or the echo."""
    try:
        if urllib.parse.urlsplit(connection.request.path).path == "/echo":
            await echo(connection)
        else:
            await chat(connection)
    except ConnectionClosedError:
        pass  # gone without a closing handshake (a lost network, a killed tab): not our error


def check_request(http_port):
    """Refuse unknown paths (404) and pages from other sites (403) before the handshake.

    websockets' own `origins=` takes a fixed list, but the page's address is whatever the
    reader typed (127.0.0.1, localhost, a LAN address): so compare with the Host header.
    """

    def process_request(connection, request):
        if urllib.parse.urlsplit(request.path).path not in ("/", "/chat", "/echo"):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "No such path: use / or /echo\n")
        origin = request.headers.get("Origin")
        host = urllib.parse.urlsplit("//" + request.headers.get("Host", "")).hostname
        if origin is not None and not is_chat_page(origin, host, http_port):
            return connection.respond(http.HTTPStatus.FORBIDDEN, "Origin not allowed\n")
        return None

    return process_request


def is_chat_page(origin, host, http_port):
    try:
        page = urllib.parse.urlsplit(origin)
        return page.scheme == "http" and page.hostname == host and page.port == http_port
    except ValueError:  # a port that is not a number
        return False


# --- The HTTP routes (hug) ------------------------------------------------------------

api = hug.API(__name__)


def ask_room(coroutine):
    """Run a coroutine on the event loop's thread and wait for its answer.

    HTTP handlers run in waitress's threads; the room belongs to the loop. Calling
    room.post(...) here only makes the coroutine: the loop runs it.
    """
    return asyncio.run_coroutine_threadsafe(coroutine, room.loop).result(timeout=HTTP_WAIT)


def since_type(value):
    """Id of the last message the client has: a whole number of 0 or more."""
    return parse_since(str(value))


def limit_type(value):
    """How many messages at most: 1 to 1000."""
    limit = whole_number(str(value), 1, 1000)
    if limit is None:
        raise BadInput("limit must be a whole number from 1 to 1000")
    return limit


@hug.get(["/", "/chat"], api=api, output=hug.output_format.html)
def page(request, response):
    """Read on every request, so that an edit to chat.html shows on reload."""
    html = PAGE.read_text(encoding="utf-8")
    response.set_header("Content-Security-Policy", page_policy(html, request.host))
    return html


def page_policy(html, host):
    """Only the page's own inline script and style (by hash) may run, and only our websocket."""
    return (
        f"default-src 'none'; script-src {inline_hashes(html, 'script')}; "
        f"style-src {inline_hashes(html, 'style')}; img-src data:; "
        f"connect-src 'self' ws://{host}:{room.ws_port}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def inline_hashes(html, tag):
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    digests = (base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() for block in blocks)
    return " ".join(f"'sha256-{digest}'" for digest in digests)


@hug.get("/config", api=api)
def config():
    """What the page needs to connect."""
    return {"ws_port": room.ws_port, "room": room.id, "max_text": MAX_TEXT, "max_name": MAX_NAME}


@hug.get(["/messages", "/get_messages"], api=api)
def get_messages(since: since_type = 0, limit: limit_type = 100):
    return {"messages": ask_room(room.recent(since, limit))}


@hug.post("/messages", api=api, status=hug.HTTP_201)
def post_message(request, response, text: clean_text, name: clean_name = None):
    """Store and broadcast a message; answers 201 and the stored message."""
    return add_http_message(request, response, name, text)


@hug.post("/send_message", api=api, status=hug.HTTP_201)
def send_message(request, response, text: clean_text = None, message: clean_text = None, name: clean_name = None):
    """The seed tutorial's name for POST /messages, which called the text `message`."""
    if text is None and message is None:
        response.status = hug.HTTP_400
        return {"errors": {"text": "Required parameter 'text' not supplied"}}
    return add_http_message(request, response, name, text or message)


def add_http_message(request, response, name, text):
    try:
        return ask_room(post_in_room(request.remote_addr, name, text))
    except TooFast as error:
        response.status = hug.HTTP_429
        response.set_header("Retry-After", "1")
        return {"errors": {"text": str(error)}}
    except RoomUnavailable as error:
        response.status = hug.HTTP_503
        return {"errors": {"room": str(error)}}


async def post_in_room(address, name, text):
    room.check_http_rate(address)
    return await room.post(name or room.guest_name(), text)


@hug.get("/health", api=api)
def health(response):
    answer = ask_room(room.health())
    if answer["status"] != "ok":
        response.status = hug.HTTP_503
    return answer


def read_utf8(body):
    """Bodies are UTF-8. hug's readers trust the header's charset, even a bogus one (a 500)."""
    try:
        return body.read().decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("the body is not valid UTF-8") from None


@hug.default_input_format("application/json", api=api)
def read_json(body, **_header_params):
    try:
        return json.loads(read_utf8(body))
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise BadInput(f"the body is not valid JSON: {error}") from None


@hug.default_input_format("application/x-www-form-urlencoded", api=api)
def read_form(body, **_header_params):
    """hug's own form reader also splits "text=a,b" into a list."""
    return parse_query_string(read_utf8(body), keep_blank=True, csv=False)


@hug.default_input_format("text/plain", api=api)
def read_text(body, **_header_params):
    return read_utf8(body)


@hug.exception(BadInput, api=api)
def bad_body(exception, response):
    """Without this a body hug cannot read is a 500 with a traceback."""
    response.status = hug.HTTP_400
    return {"errors": {"body": str(exception)}}


# --- Start-up and shutdown -------------------------------------------------------------


async def open_room(redis_url, history, loop, ws_port):
    """The room in this process, or with --redis the room in Redis (redis_room.py).

    redis_room is imported only when asked for: the default chat needs neither Redis nor
    its client.
    """
    if not redis_url:
        return Room(history, loop, ws_port)
    sys.modules.setdefault("chat", sys.modules[__name__])  # run as a script, this module is
    try:  # `chat` for redis_room's `import chat` too, rather than a second copy of it
        import redis_room
    except ModuleNotFoundError as missing:
        raise RoomUnavailable(f"--redis needs {missing.name}: python -m pip install redis") from None
    return await redis_room.open_room(redis_url, history, loop, ws_port)


class Servers:
    """The two running servers, their threads and real ports; stop() ends them all."""

    def __init__(self, host="127.0.0.1", port=8000, ws_port=8765, history=1000, redis_url=None):
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, name="websockets")
        self.loop_thread.start()
        try:
            self.http_server = self.bind_http(host, port)  # binds now, serves from run()
            self.port = int(self.http_server.effective_port)  # a string in waitress; real also for --port 0
            self.ws_server = self.in_loop(self.start_websockets(host, ws_port, self.port, history, redis_url))
            self.ws_port = room.ws_port
            self.http_thread = threading.Thread(target=self.http_server.run, name="http")
            self.http_thread.start()
        except BaseException:
            self.stop()
            raise

    def in_loop(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def bind_http(self, host, port):
        app = api.http.server(default_not_found=False)
        app.req_options.auto_parse_qs_csv = False  # or "?text=a,b" arrives as a list
        self.socket_map = {}  # waitress's own map of sockets, so stop() can close them all
        return waitress.create_server(app, host=host, port=port, map=self.socket_map, max_request_body_size=MAX_BODY)

    async def start_websockets(self, host, ws_port, http_port, history, redis_url):
        """Runs in the loop; no client is handled before it returns, so `room` is ready for them."""
        global room
        server = await serve(
            route,
            host,
            ws_port,
            process_request=check_request(http_port),
            max_size=MAX_FRAME,
            write_limit=MAX_QUEUED,
            create_connection=ChatConnection,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            compression=None,  # chat messages are small; see "Performance" in the README
        )
        loop, real_ws_port = asyncio.get_running_loop(), server.sockets[0].getsockname()[1]
        try:
            room = await open_room(redis_url, history, loop, real_ws_port)
        except BaseException:
            server.close()
            raise
        return server

    def stop(self):
        """HTTP first (its handlers wait on the loop), then the websockets (1001 to each client)."""
        if hasattr(self, "http_thread"):
            close_all = lambda: waitress.wasyncore.close_all(self.socket_map)  # noqa: E731
            self.http_server.trigger.pull_trigger(close_all)  # runs in waitress's own thread
            self.http_thread.join(5)
        elif hasattr(self, "http_server"):
            waitress.wasyncore.close_all(self.socket_map)  # bound, never served
        if hasattr(self, "http_server"):
            self.http_server.task_dispatcher.shutdown(timeout=5)
        if hasattr(self, "ws_server"):
            self.ws_server.close()
            self.in_loop(self.ws_server.wait_closed())
            self.in_loop(room.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(5)
        self.loop.close()


# --- main() ----------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="chat.py", usage=argparse.SUPPRESS, description="A real-time chat: hug + websockets."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address both servers bind (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8000, help="HTTP port, 0 for any free one")
    parser.add_argument("--ws-port", type=port_number, default=8765, help="websocket port, 0 for any free one")
    parser.add_argument("--history", type=positive, default=1000, help="messages the room keeps")
    parser.add_argument("--open", action="store_true", help="open the chat page in the browser")
    parser.add_argument("--redis", metavar="URL", help="keep the room in Redis, shared by several chat.py")
    return parser.parse_args(argv)


def port_number(value):
    port = whole_number(value, 0, 65535)
    if port is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0 to 65535)")
    return port


def positive(value):
    count = whole_number(value, 1, 999_999_999)
    if count is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of 1 or more")
    return count


def main(argv=None):
    args = parse_args(argv)
    try:
        servers = Servers(args.host, args.port, args.ws_port, args.history, args.redis)
    except RoomUnavailable as error:
        print(f"chat.py: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        where = f"{args.host}, port {args.port} or {args.ws_port}"
        print(f"chat.py: error: cannot listen on {where}: {error.strerror or error}", file=sys.stderr)
        return 2

    stop = threading.Event()  # set by Ctrl+C or SIGTERM; before the URLs, which invite both
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    page_url = f"http://{args.host}:{servers.port}/"
    print(f"Chat page:  {page_url}", flush=True)
    print(f"Websocket:  ws://{args.host}:{servers.ws_port}/", flush=True)
    if args.open:
        webbrowser.open(page_url)
    stop.wait()
    servers.stop()
    print("Stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
