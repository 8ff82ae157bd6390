"""A real-time chat in one module: hug's HTTP routes and a websockets room in one process.

    python chat.py            then open http://127.0.0.1:8000/

This is the workshop's step 5 (steps/step5_restarts.py) grown up. Two servers share this
process. The asyncio event loop runs the websocket server in one thread and owns the room: the
history, the id counter and the connections. hug's HTTP routes run in waitress's worker
threads; they never change the room themselves: they hand their work to the event loop
(ask_room()) and wait for the answer. One owner means one order: every client sees the same
messages, in the same order, as GET /messages.

Step 5's names come in step 5's order: Room, chat(), read_frame(), handle_frame(), api,
ask_room(), the routes (get_messages(), post_message(), config(), page()), Servers. What a real
room adds sits after what it extends, under a heading of its own: step 1's echo beside the
room (route(), echo()); posting over a websocket and over HTTP (step 5's post_in_room() is the
room's part of post_over_http()), with errors that say when to try again; health, the
invitation, a loop too busy to answer, three kinds of history; main(), which starts Servers
where step 5's Servers.run() did, and prints where the chat is. The armour is in parts/ (none of it imports chat), reached through small APIs,
each module with a docstring that says what it guarantees. So are the rules for what a client
may send (parts/rules.py), presence in batches (parts/presence.py), the command line
(parts/settings.py), and the addresses and the QR code printed at start (parts/invitation.py).
The workshop (docs/workshop.md) teaches it step by step; docs/protocol.md documents the
protocol as built.
"""

from parts import fixes  # first: it lets hug load where NumPy 2 is installed

# isort: split
import asyncio
import collections
import datetime
import functools
import json
import math
import signal
import sys
import threading
import time
import urllib.parse
import webbrowser
from pathlib import Path

import hug
from websockets.asyncio.server import broadcast, serve
from websockets.exceptions import ConnectionClosed

from parts import access, http_server, names, voices
from parts.access import POLICY, Policy, url_host
from parts.errors import RETRY_AFTER, BadInput, NameTaken, RoomUnavailable, TooFast
from parts.fixes import close_websockets, request_host, stop_waitress, without_nulls
from parts.history import History
from parts.invitation import invitation, invitation_policy, print_qr_code, reachable_addresses
from parts.logs import log_repeated_errors_once
from parts.presence import Presence
from parts.rules import (
    MAX_NAME,
    MAX_TEXT,
    clean_limit,
    clean_name,
    clean_ref,
    clean_since,
    clean_text,
    is_ref,
    json_limit,
)
from parts.sending import connection_limits, raise_fd_limit, send_prepared
from parts.settings import Settings, parse_args
from parts.voices import Buckets, ChatConnection, Turns, check_request, voice_of

# --- Configuration -----------------------------------------------------------------------

PAGE = Path(__file__).with_name("chat.html")

# What a client may send (a text, a name, a ref: parts/rules.py)
MAX_FRAME = 64 * 1024  # bytes; a bigger websocket frame closes the connection (1009)
MAX_BODY = 64 * 1024  # bytes (65,536) of an HTTP body at most; a bigger one gets 413 (waitress)
BURST, PER_SECOND = 20, 10  # rate limit of each client address: its websockets and HTTP posts

# The room
HISTORY_PIECE = 50  # messages per history frame: at most about 640 KB
ROOM_PATHS = ("/", "/chat", "/ws")  # the room's websocket paths; /ws is the one behind a proxy

# Time
PING_INTERVAL, PING_TIMEOUT = 20, 20  # seconds; a client that misses a pong is dropped
OPEN_TIMEOUT = 5  # seconds a websocket handshake may take, from the TCP connection on
CLOSE_TIMEOUT = 2  # seconds to wait for a client's closing handshake; shutdown must take < 5
HTTP_WAIT = 5  # seconds an HTTP handler waits for the event loop to start its work
LATE_START = 1  # seconds more it waits for work that started just in time

MAX_QUEUED = 1024 * 1024  # bytes waiting for a client that does not read; then it is dropped
ROOM = "chat.room"  # the key of the servers' Room in each HTTP request's WSGI environ


# --- The room ----------------------------------------------------------------------------


class Room:
    """Everything the chat remembers, with its history behind it (parts/history.py).

    Only the event loop's thread calls these methods, and none of them awaits anything
    but join(): each runs from start to end without anything else happening in between.
    That is what makes the loop a safe owner, with no lock anywhere. join() awaits between
    pieces of a long history, and looks at the room afresh after each (see there).

    open(), post(), fetch(), health() and close() are `async def`: the history in Redis
    awaits Redis there, the one in SQLite its file. Callers write `await room.post(...)`
    and work with any history.
    """

    def __init__(self, history, loop):
        self.history = history  # the messages: in this process, in SQLite or in Redis
        self.loop = loop  # the one thread allowed in here; see ask_room()
        self.ws_port = None  # the websocket server's real port, once it listens
        self.guests = 0
        self.clients = {}  # connection -> name
        self.presence = Presence(loop, self.send_to_all)  # who is online, told in batches
        # One voice per client address: a rate limit for messages and renames, websocket and
        # HTTP alike, a bucket of joins, and a count of its open websocket connections.
        self.message_buckets = Buckets(BURST, PER_SECOND)
        self.join_buckets = Buckets(voices.JOIN_BURST, voices.JOINS_PER_SECOND)
        self.connections_from = collections.Counter()  # client address -> open websockets
        # A few connections of one address catch up at once (send_all_but_the_last_piece())
        self.catch_up_turns = Turns(voices.CATCHING_UP_PER_ADDRESS, voices.CATCH_UP_WAIT)
        # Who goes by which name, for everyone in the room or joining it (see hold_name())
        self.names = {}  # connection -> (client address, names.same_name_key(name))
        self.holders = collections.defaultdict(collections.Counter)  # name key -> address -> count

    async def open(self):
        """Before any client: the history opens, and gives back the guest count it kept."""
        self.guests = await self.history.open(self.send_to_all)

    async def post(self, name, text, ref=None):
        """Store a message in the history, which sends it to everyone; returns the stored
        message and True.

        A `ref` the history still keeps means the client sent this message before (its
        connection dropped before the answer came): returns the stored one and False, and
        stores nothing. The message is made here, the same for every history; the history
        gives it its id.
        """
        message = {"type": "message", "id": None, "name": name, "text": text, "ts": utc_now()}
        if ref is not None:
            message["ref"] = ref
        return await self.history.add(message)

    def send_to_all(self, frame):
        """Encode once, serialize once, write to everyone without waiting (a client that stops
        reading is dropped by ChatConnection, so nobody waits for it)."""
        send_prepared(self.clients, json.dumps(frame, ensure_ascii=False))

    async def join(self, connection, name, since):
        """Send the history, then count the connection in: no message can fall in between.

        First the guest count given so far is kept (--store: on disk): the history frame
        tells a client its guest name, which no restart may give again."""
        await self.history.guest_count_kept()
        last_piece = await self.send_all_but_the_last_piece(connection, name, since)
        # broadcast() writes the last piece without awaiting, unlike `await send()`: so no
        # message can be delivered between it and the next line, which counts this client in.
        broadcast([connection], self.history_frame(name, last_piece, more=False))
        self.clients[connection] = name
        self.presence.presence_changed(connection, None, name)

    # Resuming with since=, and a long history in pieces ..................................

    async def send_all_but_the_last_piece(self, connection, name, since):
        """Send the history after `since` but its last piece; return that last piece.

        A client that resumes may have missed the whole history, 100,000 messages: it gets
        them in pieces of HISTORY_PIECE, each sent once the client has taken the one before
        (see ChatConnection.catching_up()). Messages posted meanwhile are kept, so a later
        piece has them; the last piece is the one that reaches the newest message.

        A client that never reads holds a piece and a kernel buffer for PING_TIMEOUT: so one
        address catches up on a few connections at once (Turns, in parts/voices.py), and the
        others wait their turn before anything is sent, or are ended to come back (route()).
        """
        piece = self.history.messages_since(since, HISTORY_PIECE)
        if not (piece and piece[-1]["id"] < self.history.last_id):
            return piece  # one piece: it goes out with the count-in, nothing to wait for
        async with self.catch_up_turns.turn(connection.address):
            with connection.catching_up():
                piece = self.history.messages_since(since, HISTORY_PIECE)  # the room went on
                while piece and piece[-1]["id"] < self.history.last_id:
                    await connection.send_in_time(self.history_frame(name, piece, more=True))
                    await asyncio.sleep(0)  # send() waits only for a slow client: let others in
                    piece = self.history.messages_since(piece[-1]["id"], HISTORY_PIECE)
        return piece

    def history_frame(self, name, piece, more):
        """One piece of history; `online` is who is in the room as the presence frames sent so
        far tell it, so the changes still waiting to be sent apply to it exactly once."""
        frame = {
            "type": "history",
            "room": self.history.room_id,
            "name": name,
            "messages": piece,
            "more": more,
            "online": sorted(self.presence.online.elements()),
        }
        return json.dumps(frame, ensure_ascii=False)

    def leave(self, connection):
        """Also for a connection that never got in (it went during its history)."""
        self.let_go_of_name(connection)
        if connection in self.clients:
            self.presence.presence_changed(connection, self.clients.pop(connection), None)

    def rename(self, connection, name):
        """A new name, if nobody at another address goes by it; the same name is no change."""
        old = self.clients[connection]
        if name != old:
            self.clients[connection] = self.hold_name(connection, name)
            self.presence.presence_changed(connection, old, name)

    async def fetch(self, since, limit):
        """GET /messages: messages_since(), as a coroutine that ask_room() can hand to the loop."""
        return self.history.messages_since(since, limit)

    def guest_name(self):
        """The next guest-N that nobody goes by; the history keeps the count (see join())."""
        self.guests += 1
        while names.same_name_key(f"guest-{self.guests}") in self.holders:
            self.guests += 1
        self.history.keep_guest_count(self.guests)
        return f"guest-{self.guests}"

    async def health(self):
        return {
            "status": "ok" if await self.history.healthy() else "degraded",
            "clients": len(self.clients),
            "messages": len(self.history.messages),
            "last_id": self.history.last_id,
        }

    async def close(self):
        """The history's own threads and connections (--store, --redis) end."""
        await self.history.close()

    # A name held by one person ..........................................................

    def hold_name(self, connection, name):
        """Let this connection go by `name` (returned), unless someone else holds it online.

        As IRC refuses a nick in use: "someone else" is another client address, so one
        person's two tabs (one address) may share a name. Names are compared by
        names.same_name_key(): "Bob" and Cyrillic "ВОВ" are taken when "bob" is. Held from
        the join until the connection goes; with --redis, among the clients of this process.
        """
        address, key = connection.address, names.same_name_key(name)
        self.check_name_is_free(name, address)
        self.let_go_of_name(connection)
        self.names[connection] = address, key
        self.holders[key][address] += 1
        return name

    def check_name_is_free(self, name, address):
        """NameTaken if a client at another address than `address` goes by `name`."""
        if set(self.holders.get(names.same_name_key(name), ())) - {address}:
            raise NameTaken(name)

    def let_go_of_name(self, connection):
        if connection in self.names:
            address, key = self.names.pop(connection)
            self.holders[key][address] -= 1
            if not self.holders[key][address]:
                del self.holders[key][address]
            if not self.holders[key]:
                del self.holders[key]

    # One rate limit per client address ..................................................

    def check_rate(self, address):
        """One limit per client address, shared by all its websocket connections and HTTP posts:
        two tabs of one person are one person, and a script cannot open its way around it."""
        bucket = self.message_buckets.get(address)
        if not bucket.take():
            raise TooFast(bucket.wait())

    def connected(self, address):
        """A websocket from this address was let in (check_request)."""
        self.connections_from[address] += 1

    def disconnected(self, address):
        """That websocket is gone, however it ended (ChatConnection.connection_lost)."""
        self.connections_from[address] -= 1
        if not self.connections_from[address]:
            del self.connections_from[address]  # bounded by the connections open now


def utc_now():
    """An ISO 8601 UTC timestamp with milliseconds, e.g. 2026-11-23T14:05:09.123Z."""
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- The websocket handlers --------------------------------------------------------------


async def chat(connection, room):
    """One client in the room: history first, then its frames until it goes."""
    name, since, errors = claim_name_and_since(connection, room)
    address = connection.address  # as the limits per address count it (check_request())
    try:
        await room.join(connection, name, since)
        for error in errors:  # a bad name or since in the URL: said once the client listens
            await send_error(connection, error)
        async for frame in connection:
            data = {}
            try:
                data = read_frame(frame)
                if data.get("type") == "ping":  # the page's heartbeat: answered, not counted
                    await connection.send(json.dumps({"type": "pong"}))
                    continue
                room.check_rate(address)  # messages and renames: one limit per address
                await handle_frame(connection, data, room)
            except (BadInput, RoomUnavailable) as error:
                if data.get("type") == "name":  # the page puts its name box back to the room's
                    await send_error(
                        connection,
                        f"rename refused: {error}",
                        retry_after=error.retry_after,  # too fast: the same rename may go later
                        name=room.clients[connection],
                    )
                else:
                    await send_error(connection, str(error), data.get("ref"), error.retry_after)
    finally:
        room.leave(connection)


def read_frame(frame):
    """A frame as a dict; a frame that is not a JSON object is a message's text."""
    if isinstance(frame, bytes):
        raise BadInput("binary frames are not accepted: send text")
    try:
        data = json.loads(frame)
    except json.JSONDecodeError:
        data = None
    except (ValueError, RecursionError) as error:  # past what Python reads, not bad syntax
        if frame.lstrip(" \t\n\r").startswith("{"):  # meant as an object: say why it is not
            raise BadInput(f"the frame cannot be read as JSON: {json_limit(error)}") from None
        data = None
    if not isinstance(data, dict):
        return {"type": "message", "text": frame}
    return without_nulls(data)


async def handle_frame(connection, data, room):
    """Act on one frame from a client."""
    if data.get("type") == "message":
        text, ref = clean_text(data.get("text")), clean_ref(data.get("ref"))
        await post_over_websocket(connection, room, text, ref)
    elif data.get("type") == "name":
        room.rename(connection, clean_name(data.get("name")))
    else:
        raise BadInput(
            f"unknown type: {str(data.get('type'))[:40]!r} (use 'message', 'name' or 'ping')"
        )


# --- One server, two paths: the room and step 1's echo -----------------------------------


async def route(connection, room):
    """The websocket server's one handler: the path picks the room or the echo."""
    try:
        if urllib.parse.urlsplit(connection.request.path).path == "/echo":
            await echo(connection)
        else:
            await chat(connection, room)
    except (ConnectionClosed, TimeoutError):
        # gone without a closing handshake (a lost network, a killed tab), stopped reading, or
        # waited too long for its turn to catch up
        pass


async def echo(connection):
    """The first workshop step: every frame goes straight back to its sender."""
    async for frame in connection:
        await connection.send(frame)


# --- The HTTP routes (hug) ---------------------------------------------------------------

api = hug.API(__name__)


def ask_room(room, coroutine):
    """Run a coroutine on the room's event loop and wait for its answer.

    HTTP handlers run in waitress's threads; the room belongs to the loop. Calling
    room.post(...) here only makes the coroutine: the loop runs it. Each request finds the
    room of the servers that took it in its WSGI environ (Servers.serve_http()).
    """
    return ask_loop(room.loop, coroutine)


@hug.get(["/messages", "/get_messages"], api=api)
def get_messages(request, since: clean_since = 0, limit: clean_limit = 100):
    room = request.env[ROOM]
    return {"messages": ask_room(room, room.fetch(since, limit))}


@hug.post("/messages", api=api, status=hug.HTTP_201)
def post_message(
    request, response, text: clean_text, name: clean_name = None, ref: clean_ref = None
):
    """Store and broadcast a message: 201 and the stored message (200 for a repeated ref)."""
    return post_over_http(request, response, name, text, ref)


@hug.get("/config", api=api)
def config(request):
    """What the page needs to connect."""
    room, policy = request.env[ROOM], request.env[POLICY]
    return {
        "ws_port": room.ws_port,
        "ws_path": "/ws" if policy.public_url else None,  # behind a proxy: the page's origin, /ws
        "room": room.history.room_id,
        "max_text": MAX_TEXT,
        "max_name": MAX_NAME,
    }


@hug.get(["/", "/chat"], api=api, output=hug.output_format.html)
def page(request, response):
    """Read on every request, so that an edit to chat.html shows on reload."""
    query = urllib.parse.parse_qsl(request.query_string, keep_blank_values=True)
    if request.env[POLICY].key and any(name == "key" for name, _ in query):
        return access.keep_the_key_in_a_cookie(request, response, query)
    html = PAGE.read_text(encoding="utf-8")
    csp = access.page_policy(html, websocket_address(request))
    response.set_header("Content-Security-Policy", csp)
    return html


# --- Posting, over a websocket and over HTTP ---------------------------------------------


async def post_over_websocket(connection, room, text, ref):
    """Post for one client; a repeated ref gets the stored message again, to this client only."""
    message, stored_now = await room.post(room.clients[connection], text, ref)
    if not stored_now:
        await connection.send(json.dumps(message, ensure_ascii=False))


def post_over_http(request, response, name, text, ref):
    """POST /messages and /send_message: the stored message (201, or 200 for a repeated ref),
    429 too fast, 409 for a name someone else in the room goes by."""
    room = request.env[ROOM]
    address = voice_of(request.remote_addr)  # waitress's: the proxy's X-Forwarded-For behind it

    async def post():  # in the loop: the rate, the names and a guest number are the room's
        room.check_rate(address)
        if name:  # a name someone else goes by in the room is theirs, over HTTP too
            room.check_name_is_free(name, address)
        return await room.post(name or room.guest_name(), text, ref)

    try:
        message, stored_now = ask_room(room, post())
        if not stored_now:
            response.status = hug.HTTP_200  # stored before, under this ref: nothing new
        return message
    except TooFast as error:
        response.status = hug.HTTP_429
        response.set_header("Retry-After", retry_after_header(error.retry_after))
        return {"errors": {"text": str(error)}}
    except NameTaken as error:
        response.status = hug.HTTP_409
        return {"errors": {"name": str(error)}}


# --- Errors a client is told, and when to try again --------------------------------------


async def send_error(connection, error, ref=None, retry_after=None, name=None):
    """The error, with the `ref` of the message it refuses, so the page knows which one (or for a
    refused rename, the `name` the room still knows).

    `retry_after` (seconds) only for a failure that sending the same frame again can cure
    (too fast, the room away): the page then sends it again by itself; without it the
    refusal is for good (too long, a bad name) and the person decides.
    """
    frame = {
        "type": "error",
        "error": error,
    }
    if is_ref(ref):
        frame["ref"] = ref
    if retry_after is not None:
        frame["retry_after"] = math.ceil(retry_after * 1000) / 1000  # rounded up: never early
    if name is not None:
        frame["name"] = name
    await connection.send(json.dumps(frame, ensure_ascii=False))


def websocket_address(request):
    """Where the page opens its websocket (see /config): the proxy's /ws, or the websocket port
    on the host the browser asked for (for the page's Content-Security-Policy)."""
    policy = request.env[POLICY]
    if policy.public_url:
        return policy.public_url.replace("http", "ws", 1) + "/ws"  # https: gives wss:
    return f"ws://{url_host(request_host(request))}:{request.env[ROOM].ws_port}"


def retry_after_header(seconds):
    """HTTP's Retry-After counts whole seconds: round up, so that the client is not early."""
    return str(max(1, math.ceil(seconds)))


# --- Resuming: the name and since= asked for in the URL ----------------------------------


def claim_name_and_since(connection, room):
    """The name asked for in the URL, held for this connection from now on (or a guest name),
    `since`, and what was wrong with them.

    A bad one does not refuse the connection (a browser cannot read why a handshake
    failed): the client gets a guest name, or the last 50 messages, and an error frame.
    """
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(connection.request.path).query)
    name, since, errors = None, None, []
    try:
        if "name" in query:  # held from now on, so two people cannot join as one name at once
            name = room.hold_name(connection, clean_name(query["name"][0]))
    except BadInput as error:
        errors.append(str(error))
    try:
        since = clean_since(query.get("since", [None])[0])
    except BadInput as error:
        errors.append(str(error))
    if query.get("room", [room.history.room_id])[0] != room.history.room_id:
        since = None  # ids began again in this room: the client's `since` means nothing here
    return name or room.hold_name(connection, room.guest_name()), since, errors


# --- More routes: the seed tutorial's name, health, errors as answers --------------------


@hug.post("/send_message", api=api, status=hug.HTTP_201)
def send_message(
    request,
    response,
    text: clean_text = None,
    message: clean_text = None,
    name: clean_name = None,
    ref: clean_ref = None,
):
    """The seed tutorial's name for POST /messages, which called the text `message`."""
    if text is None and message is None:
        response.status = hug.HTTP_400
        return {"errors": {"text": "Required parameter 'text' not supplied"}}
    return post_over_http(request, response, name, text or message, ref)


@hug.get("/health", api=api)
def health(request, response):
    room = request.env[ROOM]
    answer = ask_room(room, room.health())
    if answer["status"] != "ok":  # with --redis, Redis away: it passes, as every other 503 does
        response.status = hug.HTTP_503
        response.set_header("Retry-After", retry_after_header(RETRY_AFTER))
    return answer


@hug.exception(RoomUnavailable, api=api)
def room_unavailable(exception, response):
    """Redis is away, or the loop did not answer in time: 503, on every route, and when to
    try again (the same post may be sent again: with its ref it is never stored twice)."""
    response.status = hug.HTTP_503
    response.set_header("Retry-After", retry_after_header(exception.retry_after))
    return {"errors": {"room": str(exception)}}


@hug.exception(BadInput, api=api)
def bad_body(exception, response):
    """Without this a body hug cannot read is a 500 with a traceback."""
    response.status = hug.HTTP_400
    return {"errors": {"body": str(exception)}}


# --- The invitation for the projector: the link and its QR code (parts/invitation.py) ----


@hug.get("/invite", api=api, output=hug.output_format.html)
def invite(request, response):
    """The chat's link and its QR code, large, for the projector.

    Served to whoever may open the page (with the room key where one is needed, see
    access.check_room_key()): the link it shows carries that key, as the printed one does. The
    link names the address this page was opened at, so open it at the printed one.
    """
    policy = request.env[POLICY]
    query = urllib.parse.parse_qsl(request.query_string, keep_blank_values=True)
    if policy.key and any(name == "key" for name, _ in query):
        return access.keep_the_key_in_a_cookie(request, response, query)
    host = url_host(request_host(request))
    with_key = f"?key={policy.key}" if policy.key else ""
    link = f"{policy.page_origin(host)}/{with_key}"
    answer = invitation(link, access.is_loopback(access.host_name(host)))
    response.set_header("Content-Security-Policy", invitation_policy(answer))
    response.set_header("Cache-Control", "no-store")  # it shows the key: no cache keeps it
    return answer


# --- Who may talk to the chat: Host, Origin, the room key (parts/access.py) --------------
# Before any route, in this order: a foreign Host or a foreign write is refused (403), then
# a request without the room key where there is one (401). Then hug's fixes (parts/fixes.py):
# query strings and bodies read as UTF-8 or refused (400, 415), HEAD answered as GET.

hug.request_middleware(api=api)(access.check_http_request)
hug.request_middleware(api=api)(access.check_room_key)
fixes.fix_hug(api)


# --- When the loop is too busy to answer -------------------------------------------------


def ask_loop(loop, coroutine, timeout=None):
    """The one bridge from another thread into the event loop's thread: hand it a coroutine,
    wait for the answer (asyncio's thread-safe call; nothing else crosses).

    A loop too busy to start it within HTTP_WAIT gives RoomUnavailable (a 503); see
    unless_too_late() for why it then never starts.
    """
    deadline = time.monotonic() + (timeout or HTTP_WAIT)
    answer = asyncio.run_coroutine_threadsafe(unless_too_late(coroutine, deadline), loop)
    try:
        return answer.result(timeout=deadline - time.monotonic() + LATE_START)
    except TimeoutError:
        raise RoomUnavailable("the chat is too busy to answer: try again soon") from None


async def unless_too_late(coroutine, deadline):
    """Run `coroutine` only if the thread that asked for it still waits for the answer.

    Cancelling the future of run_coroutine_threadsafe() does not stop a coroutine that the
    loop starts in the same turn: a post whose client was told "503" would be stored a
    moment later, and stored twice when the client tries again. So the coroutine checks the
    time itself, first thing; one that started in time is waited for LATE_START longer.
    """
    if time.monotonic() > deadline:
        coroutine.close()  # never started, and never will be
        raise RoomUnavailable("the chat was too busy to answer in time: try again soon")
    return await coroutine


# --- The room's history: in this process, in SQLite (--store) or in Redis (--redis) ------


def open_history(settings):
    """The history the Room holds: the in-process list, or with --store kept in an SQLite
    file too, or with --redis kept in Redis (parts/history.py says what all three promise).

    parts.redis_history is imported only when asked for: the default chat needs neither Redis
    nor its client.
    """
    if settings.redis and settings.store:
        raise RoomUnavailable(
            "--store and --redis do not go together: with --redis the room is in Redis, "
            "which keeps it over a restart with its own persistence (appendonly yes)"
        )
    if settings.store:
        from parts.sqlite_history import SqliteHistory

        return SqliteHistory(settings.history, settings.store)
    if not settings.redis:
        return History(settings.history)
    try:
        from parts.redis_history import RedisHistory
    except ModuleNotFoundError as missing:
        raise RoomUnavailable(
            f"--redis needs {missing.name}: python -m pip install redis"
        ) from None
    from redis.connection import parse_url  # redis-py's reading of a URL, as from_url() reads it

    try:
        parse_url(settings.redis)  # "foo", a port of 99999: a ValueError, and a traceback at start
    except ValueError as error:
        raise RoomUnavailable(f"--redis {settings.redis} is not a Redis URL: {error}") from None
    return RedisHistory(settings.redis, settings.history)


# --- Start-up and shutdown ---------------------------------------------------------------


class Servers:
    """The two running servers, their threads and real ports, the room and the policy;
    stop() ends them all."""

    def __init__(self, settings: Settings):
        self.http_connections, self.max_clients, self.max_connections = connection_limits(
            raise_fd_limit(), settings.max_clients
        )
        log_repeated_errors_once()
        self.loop = fixes.asyncio_event_loop()  # not uvloop's, which `import hug` may have set
        self.loop_thread = threading.Thread(target=self.loop.run_forever, name="websockets")
        self.loop_thread.start()
        try:
            # Bound now, serving from run(); its port is a string in waitress, and real for 0.
            self.http_server = self.bind_http(
                settings.host, settings.port, behind_proxy=bool(settings.public_url)
            )
            self.port = int(self.http_server.effective_port)
            self.policy = Policy(self.port, settings.allow_host, settings.public_url, settings.key)
            self.ws_server = ask_loop(self.loop, self.start_websockets(settings), timeout=10)
            self.ws_port = self.room.ws_port
            self.http_thread = threading.Thread(target=self.http_server.run, name="http")
            self.http_thread.start()
        except BaseException:
            self.stop()
            raise

    def bind_http(self, host, port, behind_proxy):
        app = api.http.server(default_not_found=False)
        app.req_options.auto_parse_qs_csv = False  # or "?text=a,b" arrives as a list
        self.socket_map = {}  # waitress's own map of sockets, so stop() can close them all
        settings = {
            "map": self.socket_map,
            "max_request_body_size": MAX_BODY + 1,  # waitress refuses a body of this size
            # waitress reads requests in its one I/O thread and hands only whole ones to
            # its worker threads: an idle or trickling connection costs a descriptor and
            # a few KB, no thread. So allow many (the default, 100, was reached by 98 idle
            # connections, and then nobody got the page), free the idle ones after 30 s
            # instead of 120, looking every 5 s instead of every 30.
            "connection_limit": self.http_connections,
            "channel_timeout": 30,
            "cleanup_interval": 5,
            "backlog": 1024,  # connections the kernel queues while waitress is busy
            "asyncore_use_poll": True,  # select() fails on descriptors above 1023; poll() does not
        }
        if behind_proxy:  # each client's own address, for the rate limit, from X-Forwarded-For
            settings.update(
                trusted_proxy=access.PROXY,
                trusted_proxy_headers={"x-forwarded-for", "x-forwarded-proto"},
            )
        try:
            serve_http = functools.partial(self.serve_http, app)
            # waitress, guarded: no client holds a worker, nor one address every connection
            return http_server.create(serve_http, host, port, address_of=voice_of, **settings)
        except ValueError:  # waitress's "Invalid host/port specified.", with a traceback
            raise OSError(f"{host} is not an address, nor a name that resolves") from None

    def serve_http(self, app, environ, start_response):
        """hug's app, with this room and this policy in each request's WSGI environ (where
        WSGI passes a server's own objects to its app): the routes find them there."""
        environ[ROOM], environ[POLICY] = self.room, self.policy
        return app(environ, start_response)

    async def start_websockets(self, settings):
        """Runs in the loop; no client is handled before it returns, so the room is open."""
        self.room = Room(open_history(settings), asyncio.get_running_loop())
        self.handshakes = set()  # see close_websockets()
        server = await serve(
            functools.partial(route, room=self.room),
            settings.host,
            settings.ws_port,
            process_request=functools.partial(
                check_request,
                room=self.room,
                policy=self.policy,
                paths=(*ROOM_PATHS, "/echo"),
                max_clients=self.max_clients,
            ),
            open_timeout=OPEN_TIMEOUT,
            max_size=MAX_FRAME,
            write_limit=MAX_QUEUED,
            create_connection=functools.partial(
                ChatConnection, max_connections=self.max_connections, handshakes=self.handshakes
            ),
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            compression=None,  # chat messages are small; see docs/performance.md
        )
        self.room.ws_port = server.sockets[0].getsockname()[1]
        try:
            await self.room.open()
        except BaseException:
            server.close()
            raise
        return server

    def stop(self):
        """HTTP first (its handlers wait on the loop), then the websockets (1001 to each client).

        Also after a failed start: each step runs only if its server got that far.
        """
        try:
            if hasattr(self, "http_server"):
                stop_waitress(self.http_server, self.socket_map, getattr(self, "http_thread", None))
            if hasattr(self, "ws_server"):
                try:
                    closing = close_websockets(self.ws_server, self.handshakes, CLOSE_TIMEOUT)
                    ask_loop(self.loop, closing)
                finally:  # the room's own threads and connections (--store, --redis) end too
                    ask_loop(self.loop, self.room.close())
        finally:  # whatever failed above, the loop's thread must end, or the process cannot
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.loop_thread.join(5)
            if not self.loop_thread.is_alive():
                self.loop.close()


# --- main(): the command line, the servers, where they are, Ctrl+C -----------------------


def main(argv=None):
    settings = parse_args(argv)
    # Set by the first Ctrl+C or SIGTERM, even one that comes during start-up.
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        servers = Servers(settings)
    except RoomUnavailable as error:
        print(f"chat.py: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        where = f"{settings.host}, port {settings.port} or {settings.ws_port}"
        print(
            f"chat.py: error: cannot listen on {where}: {error.strerror or error}", file=sys.stderr
        )
        return 2

    try:
        print_where_it_is(settings, servers)
        while not stop.wait(1):  # a wait with a timeout: Windows delivers Ctrl+C only then
            pass
    except BrokenPipeError:  # `python chat.py | head -2`: nobody reads what it prints any more
        print("chat.py: error: standard output was closed: stopping", file=sys.stderr)
        return 1
    finally:  # whatever happened, the servers stop: their threads would keep the process alive
        servers.stop()
    print("Stopped.", flush=True)
    return 0


def print_where_it_is(settings, servers):
    """The links people open (with the key, where there is one), and for phones a QR code."""
    addresses = reachable_addresses(settings.host)
    with_key = f"?key={settings.key}" if settings.key else ""
    for address in addresses:  # the first two lines are machine-readable: tests and tools read them
        print(f"Chat page:  http://{url_host(address)}:{servers.port}/{with_key}", flush=True)
        print(f"Websocket:  ws://{url_host(address)}:{servers.ws_port}/{with_key}", flush=True)
    if settings.public_url:
        print(f"Public:     {settings.public_url}/{with_key} (through the proxy)", flush=True)
    invitation_at = settings.public_url or f"http://{url_host(addresses[0])}:{servers.port}"
    print(f"Invitation: {invitation_at}/invite{with_key} (for the projector)", flush=True)
    if settings.no_key:
        print(
            f"No room key (--no-key): anyone who can reach port {servers.port} is in.", flush=True
        )
    if not access.is_loopback(settings.host):
        print_qr_code(f"http://{url_host(addresses[0])}:{servers.port}/{with_key}")
    if settings.open:
        webbrowser.open(f"http://{url_host(addresses[-1])}:{servers.port}/{with_key}")


if __name__ == "__main__":
    sys.exit(main())
