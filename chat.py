"""A real-time chat in one module: hug's HTTP routes and a websockets room in one process.

    python chat.py            then open http://127.0.0.1:8000/

This is the workshop's step 3 (steps/step3_hug.py) grown up. Two servers share this process.
The asyncio event loop runs the websocket server in one thread and owns the room: the
history, the id counter and the connections. hug's HTTP routes run in waitress's worker
threads; they never change the room themselves: they hand their work to the event loop
(ask_room()) and wait for the answer. One owner means one order: every client sees the same
messages, in the same order, as GET /messages.

Step 3's names come in step 3's order: Room, room, chat(), read_frame(), handle_frame(), api,
ask_room(), get_messages(), post_message(), post_in_room(), config(), page(), Servers, main().
What a real room adds sits under a heading of its own, after what it extends, in this order:

- in Room: resuming with since= and room=, a long history in pieces, a repeated ref stored
  once, presence in batches (one change per connection), a name held by one person, one rate
  limit per client address;
- step 1's echo at /echo (route(), echo()); posting and its errors from a websocket, with
  retry_after for a failure that passes (post_from(), send_error(), read_query());
- the rules for a text, a name, a ref and since, their errors, and the rate limit's buckets
  (BadInput ... Buckets);
- the seed tutorial's POST /send_message, GET /health, errors as HTTP answers; the page's
  Content-Security-Policy; a loop too busy to answer (ask_loop(), unless_too_late());
- the room in Redis (open_room(), redis_room.py), a clean stop, the addresses and the QR code
  to print for --host 0.0.0.0, the command line (--key, --store);
- a restart that keeps the room (--store FILE: StoredRoom, HistoryFile);
- then what a first reading can skip: what a name may hold; who may talk to the chat (Policy:
  Host, Origin and the room key); host names and origins; the websocket server's guards (one
  voice per address, ChatConnection drops a client that stops reading); a frame serialized
  once for everyone (send_prepared()); descriptor limits; the same error logged once; and
  hug's request-body readers and HEAD fixed.

The README teaches it step by step; docs/protocol.md documents the protocol as built.
"""

import argparse
import asyncio
import base64
import bisect
import collections
import contextlib
import datetime
import functools
import hashlib
import hmac
import html
import http
import http.cookies
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import queue
import re
import secrets
import signal
import socket
import sqlite3
import sys
import threading
import time
import unicodedata
import urllib.parse
import webbrowser
from pathlib import Path

# A library workaround: hug 2.6.1 uses NumPy when it can import it, and then a name that
# NumPy 2 removed (np.unicode_), so `import hug` fails. The chat needs no NumPy: it is
# hidden while hug loads, and then given back to any other code.
sys.modules.setdefault("numpy", None)
import hug

if sys.modules["numpy"] is None:
    del sys.modules["numpy"]
from cgi import parse_multipart  # after hug, which imported it already: no second warning

import segno
import waitress
import waitress.wasyncore
from falcon.util.uri import parse_query_string
from hug.format import parse_content_type
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

try:
    import resource  # Unix only: on Windows there is no descriptor limit to raise
except ImportError:
    resource = None


# --- Configuration -----------------------------------------------------------------------

PAGE = Path(__file__).with_name("chat.html")

# What a client may send
MAX_TEXT = 2000  # characters, after trimming white space
MAX_NAME = 32
MAX_REF = 64  # characters of a client's own id for a message (see Room.post)
MAX_FRAME = 64 * 1024  # bytes; a bigger websocket frame closes the connection (1009)
MAX_BODY = 64 * 1024  # bytes (65,536) of an HTTP body at most; a bigger one gets 413 (waitress)
BURST, PER_SECOND = 20, 10  # rate limit of each client address: its websockets and HTTP posts

# One voice per client address (see Room.check_rate() and check_request())
MAX_PER_ADDRESS = 100  # websocket connections open at once from one address: an office's NAT fits
JOIN_BURST, JOINS_PER_SECOND = 100, 2  # handshakes one address may make at once, then a second
MAX_ADDRESSES = 10_000  # addresses whose buckets the room remembers; the least recent is forgotten

# The room
HISTORY_ON_CONNECT = 50  # messages a client gets on connect without since=
HISTORY_PIECE = 50  # messages per history frame: at most about 640 KB
PRESENCE_EVERY = 0.25  # seconds; at most one presence frame this often
ROOM_PATHS = ("/", "/chat", "/ws")  # the room's websocket paths; /ws is the one behind a proxy

# Time
PING_INTERVAL, PING_TIMEOUT = 20, 20  # seconds; a client that misses a pong is dropped
OPEN_TIMEOUT = 5  # seconds a websocket handshake may take, from the TCP connection on
CLOSE_TIMEOUT = 2  # seconds to wait for a client's closing handshake; shutdown must take < 5
HTTP_WAIT = 5  # seconds an HTTP handler waits for the event loop to start its work
LATE_START = 1  # seconds more it waits for work that started just in time
LOG_EVERY = 10  # seconds; the same error is logged at most once in this time
RETRY_AFTER = 1  # seconds a client waits before sending again what the room could not take now

# Headroom (see "Limits with headroom" below)
MAX_QUEUED = 1024 * 1024  # bytes waiting for a client that does not read; then it is dropped
MAX_CLIENTS = 10_000  # websocket connections at most; fewer if the descriptor limit is lower
HTTP_CONNECTIONS = 1000  # open HTTP connections at most; fewer if the descriptor limit is lower
FD_RESERVED = 64  # descriptors for everything else: listening sockets, pipes, Redis, log files
PROXY = (
    "127.0.0.1"  # with --public-url, the proxy on this machine whose X-Forwarded-For is believed
)


# --- The room ----------------------------------------------------------------------------


class Room:
    """Everything the chat remembers.

    Only the event loop's thread calls these methods, and none of them awaits anything
    but join(): each runs from start to end without anything else happening in between.
    That is what makes the loop a safe owner, with no lock anywhere. join() awaits between
    pieces of a long history, and looks at the room afresh after each (see there).

    post(), fetch(), health() and close() are `async def` although they await nothing
    here: the Redis room (redis_room.py) has the same methods, and there post(), health()
    and close() await Redis; StoredRoom.post() (--store) awaits its file.
    Callers write `await room.post(...)` and work with either room.
    """

    def __init__(self, history, loop, ws_port):
        self.loop = loop  # the one thread allowed in here; see ask_room()
        self.ws_port = ws_port
        self.room_id = secrets.token_hex(8)  # new on restart: tells clients that ids began again
        self.messages = collections.deque(maxlen=history)
        self.refs = {}  # ref -> the kept message that carries it
        self.last_id = 0
        self.guests = 0
        self.clients = {}  # connection -> name
        # name -> connections, as the presence frames sent so far told it
        self.online = collections.Counter()
        self.presence_changes = {}  # connection -> (name before, name now) not yet sent
        self.presence_due = False  # a presence frame is on its way
        self.presence_sent = 0.0  # loop time of the last presence frame
        # One voice per client address: a rate limit for messages and renames, websocket and
        # HTTP alike, a bucket of joins, and a count of its open websocket connections.
        self.message_buckets = Buckets(BURST, PER_SECOND)
        self.join_buckets = Buckets(JOIN_BURST, JOINS_PER_SECOND)
        self.connections_from = collections.Counter()  # client address -> open websockets
        # Who goes by which name, for everyone in the room or joining it (see hold_name())
        self.names = {}  # connection -> (client address, name_key(name))
        self.holders = collections.defaultdict(collections.Counter)  # name key -> address -> count

    async def post(self, name, text, ref=None):
        """Store a message and send it to everyone; returns the stored message and True.

        A `ref` the room still keeps means the client sent this message before (its
        connection dropped before the answer came): returns the stored one and False, and
        stores nothing. It awaits nothing here. The Redis room (redis_room.py) stores it in
        Redis instead, and every process delivers it when Redis publishes it.
        """
        if ref in self.refs:
            return self.refs[ref], False
        message = {
            "type": "message",
            "id": self.last_id + 1,
            "name": name,
            "text": text,
            "ts": utc_now(),
        }
        if ref is not None:
            message["ref"] = ref
        return self.deliver(message), True

    def deliver(self, message):
        """Keep a message and send it to everyone connected here, in id order."""
        if len(self.messages) == self.messages.maxlen:  # the oldest is dropped: so is its ref
            self.refs.pop(self.messages[0].get("ref"), None)
        if "ref" in message:
            self.refs[message["ref"]] = message
        self.last_id = message["id"]
        self.messages.append(message)
        self.send_to_all(message)
        return message

    def send_to_all(self, frame):
        """Encode once, serialize once, write to everyone without waiting (a client that stops
        reading is dropped by ChatConnection, so nobody waits for it)."""
        send_prepared(self.clients, json.dumps(frame, ensure_ascii=False))

    async def join(self, connection, name, since):
        """Send the history, then count the connection in: no message can fall in between."""
        last_piece = await self.send_all_but_the_last_piece(connection, name, since)
        # broadcast() writes the last piece without awaiting, unlike `await send()`: so no
        # message can be delivered between it and the next line, which counts this client in.
        broadcast([connection], self.history_frame(name, last_piece, more=False))
        self.clients[connection] = name
        self.presence_changed(connection, None, name)

    async def send_all_but_the_last_piece(self, connection, name, since):
        """Send the history after `since` but its last piece; return that last piece.

        A client that resumes may have missed the whole history, 100,000 messages: it gets
        them in pieces of HISTORY_PIECE, each sent once the client has taken the one before
        (see ChatConnection.catching_up()). Messages posted meanwhile are kept, so a later
        piece has them; the last piece is the one that reaches the newest message.
        """
        with connection.catching_up():
            piece = self.messages_since(since, HISTORY_PIECE)
            while piece and piece[-1]["id"] < self.last_id:
                await connection.send_in_time(self.history_frame(name, piece, more=True))
                await asyncio.sleep(0)  # send() waits only for a slow client: let others in too
                piece = self.messages_since(piece[-1]["id"], HISTORY_PIECE)
        return piece

    def history_frame(self, name, piece, more):
        """One piece of history; `online` is who is in the room as the presence frames sent so
        far tell it, so the changes still waiting to be sent apply to it exactly once."""
        frame = {
            "type": "history",
            "room": self.room_id,
            "name": name,
            "messages": piece,
            "more": more,
            "online": sorted(self.online.elements()),
        }
        return json.dumps(frame, ensure_ascii=False)

    def leave(self, connection):
        """Also for a connection that never got in (it went during its history)."""
        self.let_go_of_name(connection)
        if connection in self.clients:
            self.presence_changed(connection, self.clients.pop(connection), None)

    def rename(self, connection, name):
        """A new name, if nobody at another address goes by it; the same name is no change."""
        old = self.clients[connection]
        if name != old:
            self.clients[connection] = self.hold_name(connection, name)
            self.presence_changed(connection, old, name)

    def presence_changed(self, connection, before, after):
        """Send presence on the loop's next turn, or with the next changes if a frame went out
        less than PRESENCE_EVERY ago.

        Each frame goes to everyone: a frame per join would cost the square of the room's
        size, and filling a room of 1000 would take seconds. What one connection does in
        the meantime is one change, from the name the others last heard to its name now:
        a join then a rename is a join under the new name, a join then a leave is nothing.
        """
        if connection in self.presence_changes:  # its earlier change is not sent yet
            before = self.presence_changes[connection][0]
        self.presence_changes[connection] = (before, after)
        if not self.presence_due:
            self.presence_due = True
            wait = self.presence_sent + PRESENCE_EVERY - self.loop.time()
            self.loop.call_later(max(0, wait), self.send_presence)

    def send_presence(self):
        """Only what changed: the whole online list is in each client's history frame.

        A frame that listed everyone let one client renaming 9 times a second make the
        server send 114 MB/s to a room of 900.
        """
        pending, self.presence_changes, self.presence_due = self.presence_changes, {}, False
        changes = [
            change for change in itertools.starmap(self.presence_change, pending.values()) if change
        ]
        if not changes:  # say, a join and a leave: nobody needs to hear of it
            return
        self.presence_sent = self.loop.time()
        frame = {"type": "presence", "changes": changes}
        if len(changes) == 1:
            frame.update(changes[0])  # one change: {"joined": "bob"}, as the contract shows
        self.send_to_all(frame)
        for change in changes:
            self.count_online(change)

    @staticmethod
    def presence_change(before, after):
        """One connection's change as a presence frame tells it (None for no change at all)."""
        if before == after:  # a join then a leave, or a rename and back
            return None
        if before is None:
            return {"joined": after}
        if after is None:
            return {"left": before}
        return {"renamed": {"from": before, "to": after}}

    def count_online(self, change):
        """Keep `online` as the presence frames sent so far tell it (see history_frame())."""
        if "renamed" in change:
            change = {"left": change["renamed"]["from"], "joined": change["renamed"]["to"]}
        if "left" in change:
            self.online[change["left"]] -= 1
            if not self.online[change["left"]]:
                del self.online[change["left"]]
        if "joined" in change:
            self.online[change["joined"]] += 1

    async def fetch(self, since, limit):
        """GET /messages: messages_since(), as a coroutine that ask_room() can hand to the loop."""
        return self.messages_since(since, limit)

    def messages_since(self, since=None, limit=None):
        """Kept messages with an id greater than `since`, oldest first; the last 50 without it.

        Ids only grow, so bisection finds the first one, and only what is returned is copied:
        a room that keeps 100,000 messages answers as fast as one that keeps 100.
        """
        if since is None:
            start = max(0, len(self.messages) - HISTORY_ON_CONNECT)
        else:
            start = bisect.bisect_right(self.messages, since, key=operator.itemgetter("id"))
        stop = len(self.messages) if limit is None else min(len(self.messages), start + limit)
        return [self.messages[i] for i in range(start, stop)]

    def guest_name(self):
        """The next guest-N that nobody goes by."""
        self.guests += 1
        while name_key(f"guest-{self.guests}") in self.holders:
            self.guests += 1
        return f"guest-{self.guests}"

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

    def hold_name(self, connection, name):
        """Let this connection go by `name` (returned), unless someone else holds it online.

        As IRC refuses a nick in use: "someone else" is another client address, so one
        person's two tabs (one address) may share a name. Names are compared by name_key():
        "Bob" is taken when "bob" is. Held from the join until the connection goes; with
        --redis, among the clients of this process.
        """
        address, key = voice_of(client_address(connection)), name_key(name)
        self.check_name_is_free(name, address)
        self.let_go_of_name(connection)
        self.names[connection] = address, key
        self.holders[key][address] += 1
        return name

    def check_name_is_free(self, name, address):
        """NameTaken if a client at another address than `address` goes by `name`."""
        if set(self.holders.get(name_key(name), ())) - {address}:
            raise NameTaken(name)

    def let_go_of_name(self, connection):
        if connection in self.names:
            address, key = self.names.pop(connection)
            self.holders[key][address] -= 1
            if not self.holders[key][address]:
                del self.holders[key][address]
            if not self.holders[key]:
                del self.holders[key]

    async def health(self):
        return {
            "status": "ok",
            "clients": len(self.clients),
            "messages": len(self.messages),
            "last_id": self.last_id,
        }

    async def close(self):
        """Nothing to let go of here; the Redis room closes its connections."""


room = None  # the one Room of this process, made when the servers start


# --- The websocket handlers --------------------------------------------------------------


async def chat(connection):
    """One client in the room: history first, then its frames until it goes."""
    name, since, errors = read_query(connection)
    address = voice_of(client_address(connection))
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
                await handle_frame(connection, data)
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


async def handle_frame(connection, data):
    """Act on one frame from a client."""
    if data.get("type") == "message":
        await post_from(connection, clean_text(data.get("text")), clean_ref(data.get("ref")))
    elif data.get("type") == "name":
        room.rename(connection, clean_name(data.get("name")))
    else:
        raise BadInput(
            f"unknown type: {str(data.get('type'))[:40]!r} (use 'message', 'name' or 'ping')"
        )


# --- One server, two paths: the room and step 1's echo -----------------------------------


async def route(connection):
    """The websocket server's one handler: the path picks the room or the echo."""
    try:
        if urllib.parse.urlsplit(connection.request.path).path == "/echo":
            await echo(connection)
        else:
            await chat(connection)
    except (ConnectionClosed, TimeoutError):
        pass  # gone without a closing handshake (a lost network, a killed tab), or stopped reading


async def echo(connection):
    """The first workshop step: every frame goes straight back to its sender."""
    async for frame in connection:
        await connection.send(frame)


# --- Posting from a websocket, and its errors --------------------------------------------


async def post_from(connection, text, ref):
    """Post for one client; a repeated ref gets the stored message again, to this client only."""
    message, stored_now = await room.post(room.clients[connection], text, ref)
    if not stored_now:
        await connection.send(json.dumps(message, ensure_ascii=False))


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


def read_query(connection):
    """The name and `since` asked for in the URL, and what was wrong with them.

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
        since = parse_since(query.get("since", [None])[0])
    except BadInput as error:
        errors.append(str(error))
    if query.get("room", [room.room_id])[0] != room.room_id:
        since = None  # ids began again in this room: the client's `since` means nothing here
    return name or room.hold_name(connection, room.guest_name()), since, errors


# --- The room's rules: what a text, a name, a ref and `since` may be; how fast to post ---


class BadInput(ValueError):
    """A client sent something the contract does not allow; the message says the rule."""

    retry_after = None  # a refusal: the same frame sent again would be refused again


class TooFast(BadInput):
    """More than BURST messages at once, or more than PER_SECOND a second for long.

    Not a refusal for good: the same message goes through once the limit allows one more,
    `retry_after` seconds from now (the error frame says so, and the page waits that long).
    """

    def __init__(self, retry_after=1 / PER_SECOND):  # the longest wait for one more
        super().__init__("too many messages too fast: wait a second")
        self.retry_after = retry_after


class NameTaken(BadInput):
    """Someone at another address goes by this name in the room."""

    def __init__(self, name):
        super().__init__(f"the name {name!r} is taken: someone else in the room goes by it")


class RoomUnavailable(Exception):
    """The room cannot store messages right now (with --redis: Redis is away; or the loop is
    too busy): a transient failure, so the client may send the same message again."""

    retry_after = RETRY_AFTER


def clean_text(value):
    """The text of a message; hug uses it as a type too, so HTTP and websocket agree."""
    return trimmed(value, "text", MAX_TEXT)


def clean_name(value):
    """A display name that shows what it is: no control or format characters, something
    visible, no pile of combining marks. NFC, so "é" is one character however it was typed."""
    if isinstance(value, str):
        value = unicodedata.normalize("NFC", value)
    name = trimmed(value, "name", MAX_NAME)
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        raise BadInput("name has control characters")  # a newline in the online list helps nobody
    check_format_characters(name)
    if all(is_invisible(c) for c in name):
        raise BadInput("name shows nothing: it has only white space, invisible or combining marks")
    if longest_run_of_marks(name) > MAX_MARKS:
        raise BadInput(f"name has more than {MAX_MARKS} combining marks in a row")
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


def clean_ref(value):
    """A client's own id for a message, or None: the page sends it again after a reconnect."""
    if value is None:
        return None
    if not is_ref(value):
        raise BadInput(f"ref must be a string of 1 to {MAX_REF} characters")
    return value


def is_ref(value):
    return isinstance(value, str) and 1 <= len(value) <= MAX_REF


def without_nulls(data):
    """A JSON object without its null fields: null is the same as leaving a field out, for
    every field, over HTTP and websocket alike."""
    if not isinstance(data, dict):
        return data
    return {key: value for key, value in data.items() if value is not None}


def parse_since(value):
    """`since` from a query string: None when absent, else a whole number of 0 or more."""
    if value is None:
        return None
    since = whole_number(value, 0, 10**100 - 1)  # any id a client could hold, and then some
    if since is None:
        raise BadInput("since must be a whole number of 0 or more")
    return since


def since_type(value):
    """Id of the last message the client has: a whole number of 0 or more."""
    return parse_since(str(value))


def limit_type(value):
    """How many messages at most: 1 to 1000."""
    limit = whole_number(str(value), 1, 1000)
    if limit is None:
        raise BadInput("limit must be a whole number from 1 to 1000")
    return limit


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
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TokenBucket:
    """`burst` at once, then `per_second` a second: a person never notices, a script does."""

    def __init__(self, burst=BURST, per_second=PER_SECOND):
        self.burst, self.per_second = burst, per_second
        self.tokens, self.last = burst, time.monotonic()

    def take(self):
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.per_second)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def wait(self):
        """Seconds until take() succeeds again (0 if it would now)."""
        return max(0.0, (1 - self.tokens) / self.per_second)


class Buckets:
    """A TokenBucket per client address, bounded: past MAX_ADDRESSES the one used least recently
    is forgotten. It has most likely filled up again, and forgetting it gives at worst a fresh
    burst to one address (clearing them all, as before, gave one to everyone at once)."""

    def __init__(self, burst, per_second):
        self.burst, self.per_second = burst, per_second
        self.buckets = {}  # address -> TokenBucket, the least recently used first

    def get(self, address):
        """The address's bucket, now the most recently used."""
        bucket = self.buckets.pop(address, None) or TokenBucket(self.burst, self.per_second)
        self.buckets[address] = bucket  # the most recently used goes last
        if len(self.buckets) > MAX_ADDRESSES:
            del self.buckets[next(iter(self.buckets))]
        return bucket

    def take(self, address):
        return self.get(address).take()


# --- The HTTP routes (hug) ---------------------------------------------------------------

api = hug.API(__name__)


def ask_room(coroutine):
    """Run a coroutine on the room's event loop and wait for its answer.

    HTTP handlers run in waitress's threads; the room belongs to the loop. Calling
    room.post(...) here only makes the coroutine: the loop runs it.
    """
    return ask_loop(room.loop, coroutine)


@hug.get(["/messages", "/get_messages"], api=api)
def get_messages(since: since_type = 0, limit: limit_type = 100):
    return {"messages": ask_room(room.fetch(since, limit))}


@hug.post("/messages", api=api, status=hug.HTTP_201)
def post_message(
    request, response, text: clean_text, name: clean_name = None, ref: clean_ref = None
):
    """Store and broadcast a message: 201 and the stored message (200 for a repeated ref)."""
    return add_http_message(request, response, name, text, ref)


async def post_in_room(address, name, text, ref):
    room.check_rate(address)
    if name:  # a name someone else goes by in the room is theirs, over HTTP too
        room.check_name_is_free(name, address)
    return await room.post(name or room.guest_name(), text, ref)


@hug.get("/config", api=api)
def config():
    """What the page needs to connect."""
    return {
        "ws_port": room.ws_port,
        "ws_path": "/ws"
        if policy.public_url
        else None,  # behind a proxy: the page's own origin, at /ws
        "room": room.room_id,
        "max_text": MAX_TEXT,
        "max_name": MAX_NAME,
    }


@hug.get(["/", "/chat"], api=api, output=hug.output_format.html)
def page(request, response):
    """Read on every request, so that an edit to chat.html shows on reload."""
    query = urllib.parse.parse_qsl(request.query_string, keep_blank_values=True)
    if policy.key and any(name == "key" for name, _ in query):
        return keep_the_key_in_a_cookie(request, response, query)
    html = PAGE.read_text(encoding="utf-8")
    # The name as the browser wrote it ("localhost." too: the CSP must name what it connects
    # to), not falcon's request.host, which raises for "Host: localhost:" (a 500).
    host = request.get_header("Host")
    host = host_and_port(host)[0] if host else request.env["SERVER_NAME"]
    response.set_header("Content-Security-Policy", page_policy(html, host))
    return html


@hug.get("/invite", api=api, output=hug.output_format.html)
def invite(request, response):
    """The invitation for the projector: the chat's link and its QR code, large.

    Served to whoever may open the page (with the room key where one is needed, see
    check_room_key()): the link it shows carries that key, as the printed one does. The
    link names the address this page was opened at, so open it at the printed one.
    """
    query = urllib.parse.parse_qsl(request.query_string, keep_blank_values=True)
    if policy.key and any(name == "key" for name, _ in query):
        return keep_the_key_in_a_cookie(request, response, query)
    host = request.get_header("Host") or request.env["SERVER_NAME"]
    with_key = f"?key={policy.key}" if policy.key else ""
    answer = invitation(f"{policy.page_origin(host)}/{with_key}", is_loopback(host_name(host)))
    response.set_header("Content-Security-Policy", invitation_policy(answer))
    return answer


INVITATION = """<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chat: join in</title>
<style>
body {{ margin: 0; min-height: 100dvh; display: grid; place-content: center; gap: 2vmin;
       background: #fff; color: #000; font: 4vmin/1.3 system-ui, sans-serif; text-align: center; }}
h1 {{ margin: 0; font-size: 1.4em; }}
p {{ margin: 0; overflow-wrap: anywhere; }}
svg {{ width: 70vmin; height: 70vmin; margin: auto; }}
.only-here {{ color: #b91c1c; font-size: .7em; }}
</style>
<h1>Join the chat</h1>
{qr_code}
<p>Scan the code, or open <a href="{link}">{link}</a></p>
{warning}
</html>
"""


def invitation(link, only_here):
    """The invitation's HTML: a QR code drawn dark on light, whatever the screen's theme."""
    qr_code = segno.make_qr(link).svg_inline(
        omitsize=True, dark="#000", light="#fff", title="The chat's link as a QR code"
    )
    warning = (
        '<p class="only-here">This address works only on this machine: open the invitation '
        "at the address the chat printed.</p>"
        if only_here
        else ""
    )
    return INVITATION.format(qr_code=qr_code, link=html.escape(link), warning=warning)


def invitation_policy(invitation_html):
    """No script at all: only the invitation's own inline style."""
    return (
        f"default-src 'none'; style-src {inline_hashes(invitation_html, 'style')}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


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
    return add_http_message(request, response, name, text or message, ref)


def add_http_message(request, response, name, text, ref):
    try:
        address = voice_of(request.remote_addr)  # waitress's: the proxy's X-Forwarded-For behind it
        message, stored_now = ask_room(post_in_room(address, name, text, ref))
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


def retry_after_header(seconds):
    """HTTP's Retry-After counts whole seconds: round up, so that the client is not early."""
    return str(max(1, math.ceil(seconds)))


@hug.get("/health", api=api)
def health(response):
    answer = ask_room(room.health())
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


# --- The page's Content-Security-Policy --------------------------------------------------


def page_policy(html, host):
    """Only the page's own inline script and style (by hash) may run, and only our websocket."""
    return (
        f"default-src 'none'; script-src {inline_hashes(html, 'script')}; "
        f"style-src {inline_hashes(html, 'style')}; img-src data:; "
        f"connect-src 'self' {websocket_address(host)}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def websocket_address(host):
    """Where the page opens its websocket (see /config): the proxy's /ws, or the websocket port."""
    if policy.public_url:
        return policy.public_url.replace("http", "ws", 1) + "/ws"  # https: gives wss:
    return f"ws://{url_host(host)}:{room.ws_port}"


def inline_hashes(html, tag):
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    digests = (
        base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() for block in blocks
    )
    return " ".join(f"'sha256-{digest}'" for digest in digests)


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


# --- Start-up and shutdown ---------------------------------------------------------------


class Servers:
    """The two running servers, their threads and real ports; stop() ends them all."""

    def __init__(
        self,
        host="127.0.0.1",
        port=8000,
        ws_port=8765,
        history=1000,
        redis_url=None,
        allowed_hosts=(),
        public_url=None,
        key=None,
        store=None,
    ):
        self.http_connections, self.max_clients, self.max_connections = connection_limits(
            raise_fd_limit()
        )
        log_repeated_errors_once()
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, name="websockets")
        self.loop_thread.start()
        try:
            # Bound now, serving from run(); its port is a string in waitress, and real for 0.
            self.http_server = self.bind_http(host, port, behind_proxy=bool(public_url))
            self.port = int(self.http_server.effective_port)
            global policy
            policy = Policy(self.port, allowed_hosts, public_url, key)
            starting = self.start_websockets(host, ws_port, history, redis_url, store)
            self.ws_server = ask_loop(self.loop, starting, timeout=10)
            self.room = room  # the module's `room` too, which the handlers use
            self.ws_port = room.ws_port
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
        if (
            behind_proxy
        ):  # each client's own address, for the rate limit, from the proxy's X-Forwarded-For
            settings.update(
                trusted_proxy=PROXY, trusted_proxy_headers={"x-forwarded-for", "x-forwarded-proto"}
            )
        try:
            return waitress.create_server(app, host=host, port=port, **settings)
        except ValueError:  # waitress's "Invalid host/port specified.", with a traceback
            raise OSError(f"{host} is not an address, nor a name that resolves") from None

    async def start_websockets(self, host, ws_port, history, redis_url, store=None):
        """Runs in the loop; no client is handled before it returns, so `room` is ready for them."""
        global room
        self.handshakes = set()  # see close_websockets()
        server = await serve(
            route,
            host,
            ws_port,
            process_request=functools.partial(check_request, max_clients=self.max_clients),
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
        loop, real_ws_port = asyncio.get_running_loop(), server.sockets[0].getsockname()[1]
        try:
            room = await open_room(redis_url, history, loop, real_ws_port, store)
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
                    ask_loop(self.loop, close_websockets(self.ws_server, self.handshakes))
                finally:  # the room's own threads and connections (--store, --redis) end too
                    ask_loop(self.loop, self.room.close())
        finally:  # whatever failed above, the loop's thread must end, or the process cannot
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.loop_thread.join(5)
            if not self.loop_thread.is_alive():
                self.loop.close()


async def open_room(redis_url, history, loop, ws_port, store=None):
    """The room in this process, with --store kept in a file too, or with --redis the room
    in Redis (redis_room.py).

    redis_room is imported only when asked for: the default chat needs neither Redis nor
    its client.
    """
    if redis_url and store:
        raise RoomUnavailable(
            "--store and --redis do not go together: with --redis the room is in Redis, "
            "which keeps it over a restart with its own persistence (appendonly yes)"
        )
    if store:
        return StoredRoom(history, loop, ws_port, store)
    if not redis_url:
        return Room(history, loop, ws_port)
    try:
        import redis_room
    except ModuleNotFoundError as missing:
        raise RoomUnavailable(
            f"--redis needs {missing.name}: python -m pip install redis"
        ) from None
    from redis.connection import parse_url  # redis-py's reading of a URL, as from_url() reads it

    try:
        parse_url(redis_url)  # "foo", a port of 99999: a ValueError, and a traceback at start
    except ValueError as error:
        raise RoomUnavailable(f"--redis {redis_url} is not a Redis URL: {error}") from None
    # What the Redis room builds on is handed over, not imported: see redis_room.py.
    return await redis_room.open_room(
        redis_url, history, loop, ws_port, base=Room, unavailable=RoomUnavailable, utc_now=utc_now
    )


def stop_waitress(server, socket_map, thread):
    """Stop a waitress server that runs in `thread` (None: bound, but never served).

    waitress documents only serve(), which runs until the process ends. To stop it from
    another thread, its own trigger (a pipe its I/O loop watches) runs close_all() in that
    loop; a request's wake-up can come first and close the trigger, which is just as good.
    Then its worker threads finish the requests they have.
    """
    close_all = functools.partial(waitress.wasyncore.close_all, socket_map)
    if thread is None:
        close_all()
    else:
        with contextlib.suppress(OSError):  # the trigger was closed by the time we pulled it
            server.trigger.pull_trigger(close_all)
        thread.join(5)
    server.task_dispatcher.shutdown(timeout=5)


async def close_websockets(server, handshakes):
    """websockets' close() (1001 to every client), without waiting out the handshakes under way.

    close() answers a handshake that is under way with a 503 when its request comes, and
    waits for it until OPEN_TIMEOUT: one idle TCP connection held a shutdown for 5 s. So they
    are closed here; a connection that comes after close() is closed by
    ChatConnection.connection_made() (close() stops accepting only in a task of its own).
    """
    server.close()
    for connection in list(handshakes):
        connection.transport.abort()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):  # what each closing handshake may take
            await server.wait_closed()
    except TimeoutError:
        # A client catching up that stopped reading: its close frame waits behind a history
        # piece it never takes (see ChatConnection.catching_up()), and close() with it. Such
        # a client held a shutdown for the ping timeout, 20 s, and stop() gave up at 6.
        for connection in list(server.all_connections):
            connection.transport.abort()
        await server.wait_closed()


# --- main() ------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    # Set by the first Ctrl+C or SIGTERM, even one that comes during start-up.
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        servers = Servers(
            args.host,
            args.port,
            args.ws_port,
            args.history,
            args.redis,
            args.allow_host,
            args.public_url,
            args.key,
            args.store,
        )
    except RoomUnavailable as error:
        print(f"chat.py: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        where = f"{args.host}, port {args.port} or {args.ws_port}"
        print(
            f"chat.py: error: cannot listen on {where}: {error.strerror or error}", file=sys.stderr
        )
        return 2

    addresses = reachable_addresses(args.host)
    with_key = f"?key={args.key}" if args.key else ""  # the link people open: the key goes with it
    for address in addresses:  # the first two lines are machine-readable: tests and tools read them
        print(f"Chat page:  http://{url_host(address)}:{servers.port}/{with_key}", flush=True)
        print(f"Websocket:  ws://{url_host(address)}:{servers.ws_port}/{with_key}", flush=True)
    if args.public_url:
        print(f"Public:     {args.public_url}/{with_key} (through the proxy)", flush=True)
    invitation_at = args.public_url or f"http://{url_host(addresses[0])}:{servers.port}"
    print(f"Invitation: {invitation_at}/invite{with_key} (for the projector)", flush=True)
    if args.no_key:
        print(
            f"No room key (--no-key): anyone who can reach port {servers.port} is in.", flush=True
        )
    if not is_loopback(args.host):
        print_qr_code(f"http://{url_host(addresses[0])}:{servers.port}/{with_key}")
    if args.open:
        webbrowser.open(f"http://{url_host(addresses[-1])}:{servers.port}/{with_key}")

    while not stop.wait(1):  # a wait with a timeout: Windows delivers Ctrl+C only then
        pass
    servers.stop()
    print("Stopped.", flush=True)
    return 0


def reachable_addresses(host):
    """The addresses to print for --host: 0.0.0.0 (or ::) is every address, and nobody can open it.

    So print this machine's own addresses, loopback last (it works only here): the one its
    default route leaves from (connecting a UDP socket sends nothing, it only picks the
    route) and the ones its host name resolves to.
    """
    if host not in ("0.0.0.0", "::"):
        return [host]
    family, somewhere, loopback = (
        (socket.AF_INET, "198.51.100.1", "127.0.0.1")
        if host == "0.0.0.0"
        else (socket.AF_INET6, "2001:db8::1", "::1")
    )
    found = []
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((somewhere, 9))  # a documentation address: any routed one would do
        found.append(probe.getsockname()[0])
    with contextlib.suppress(OSError):
        found += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, family)]
    lan = [
        address for address in found if not ipaddress.ip_address(address.split("%")[0]).is_loopback
    ]
    return [*dict.fromkeys(lan), loopback]


def print_qr_code(url):
    """The first page URL as a QR code, for phones (see qr_code_lines()). A terminal that
    cannot show the blocks gets no QR code."""
    with contextlib.suppress(UnicodeEncodeError):
        print("\n".join(qr_code_lines(url)), flush=True)


BLOCKS = {(0, 0): " ", (1, 0): "\u2580", (0, 1): "\u2584", (1, 1): "\u2588"}  # dark (top, bottom)
BLACK_ON_WHITE, RESET = "\033[30;107m", "\033[0m"


def qr_code_lines(url):
    """A QR code of `url` for a terminal: half blocks, two rows of modules a line.

    The dark modules are the drawn ones, in black on a white background, with a quiet zone
    of 4 modules around: right on a dark terminal, a light one and a projector alike.
    (segno's own terminal output draws in the terminal's colours: inverted on one of them.)
    make_qr(), not make(): make() picks a Micro QR code for short texts, which phone cameras
    often do not read.
    """
    rows = [list(row) for row in segno.make_qr(url).matrix_iter(border=4)]
    rows.append([0] * len(rows[0]))  # an odd count of rows: the last line's lower half is light
    return [
        BLACK_ON_WHITE + "".join(BLOCKS[pair] for pair in zip(top, bottom, strict=True)) + RESET
        for top, bottom in zip(rows[::2], rows[1::2], strict=True)
    ]


# --- The command line --------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="chat.py", usage=argparse.SUPPRESS, description="A real-time chat: hug + websockets."
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address both servers bind (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=port_number, default=8000, help="HTTP port, 0 for any free one"
    )
    parser.add_argument(
        "--ws-port", type=port_number, default=8765, help="websocket port, 0 for any free one"
    )
    parser.add_argument("--history", type=positive, default=1000, help="messages the room keeps")
    parser.add_argument("--open", action="store_true", help="open the chat page in the browser")
    parser.add_argument(
        "--redis", metavar="URL", help="keep the room in Redis, shared by several chat.py"
    )
    parser.add_argument(
        "--store",
        metavar="FILE",
        type=file_name,
        help="keep the history in this SQLite file, over restarts",
    )
    parser.add_argument(
        "--allow-host",
        metavar="NAME",
        type=host_name_argument,
        action="append",
        default=[],
        help="a host name the chat answers to, besides IP addresses, localhost, *.localhost "
        "and this machine's name (repeatable)",
    )
    parser.add_argument(
        "--public-url",
        metavar="URL",
        type=public_url,
        help="the https:// URL people reach the chat at, through a reverse proxy on this machine",
    )
    parser.add_argument(
        "--key",
        type=room_key_argument,
        # CHAT_KEY in the environment: a key on the command line shows in every user's `ps`
        default=os.environ.get("CHAT_KEY") or None,
        help="the room key people need, so a restart keeps the link (default: $CHAT_KEY, else a "
        "new random one when --host is not loopback or with --public-url; the same one for "
        "every --redis process)",
    )
    parser.add_argument(
        "--no-key",
        action="store_true",
        help="no room key even where strangers can reach the chat: anyone who can reach it is in",
    )
    args = parser.parse_args(argv)
    choose_room_key(parser, args)
    return args


def choose_room_key(parser, args):
    """A key wherever strangers can reach the chat: a --host that is not loopback, --public-url.

    Several processes of one room (--redis) must accept one key: each would make its own, so
    they are given the same --key (the docs say so).
    """
    exposed = args.public_url or not is_loopback(args.host)
    if args.key and args.no_key:
        parser.error("--key and --no-key: choose one")
    if args.no_key or args.key or not exposed:
        args.no_key = args.no_key and exposed  # --no-key on loopback changes nothing
        return
    if args.redis:
        parser.error(
            "--redis where strangers can reach the chat: give every process the same --key=KEY "
            "or CHAT_KEY (make one: python -c 'import secrets; print(secrets.token_urlsafe())')"
        )
    args.key = new_room_key()


def new_room_key():
    """128 random bits, in the letters a URL keeps as they are. Never one that begins with "-",
    which `--key KEY` would read as another option when the key is given back after a restart."""
    key = secrets.token_urlsafe(16)
    while key.startswith("-"):
        key = secrets.token_urlsafe(16)
    return key


def is_loopback(host):
    """Whether only this machine can reach an address to bind: 127.0.0.1, ::1, localhost."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower().rstrip(".") == "localhost"


def room_key_argument(value):
    if not re.fullmatch(r"[A-Za-z0-9_-]{16,200}", value):
        raise argparse.ArgumentTypeError(
            "a room key is 16 or more letters, digits, - or _ (make one: "
            "python -c 'import secrets; print(secrets.token_urlsafe())')"
        )
    return value


def host_name_argument(value):
    try:
        name = host_name(value)
    except ValueError:
        name = None
    if not name or name != value.lower().rstrip(".") or "/" in value:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a host name such as chat.lan (no scheme, no port)"
        )
    return name


def public_url(value):
    """http(s)://host[:port] and no path: the page's origin, where it finds /config and /ws."""
    if origin_parts(value):  # None when it is no URL at all, or its port is not a number
        url = urllib.parse.urlsplit(value)
        just_an_origin = url.path in ("", "/") and not url.query and not url.fragment
        if (
            url.scheme in ("http", "https")
            and url.hostname
            and "@" not in url.netloc
            and just_an_origin
        ):
            return f"{url.scheme}://{url.netloc.lower()}"
    raise argparse.ArgumentTypeError(
        f"{value!r} is not a URL such as https://chat.example.org (no path)"
    )


def port_number(value):
    port = whole_number(value, 0, 65535)
    if port is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0 to 65535)")
    return port


def file_name(value):
    """Not empty: --store "" (an unset variable in a unit file) kept nothing, without a word."""
    if not value:
        raise argparse.ArgumentTypeError("give a file name, such as chat.db")
    return value


def positive(value):
    count = whole_number(value, 1, 999_999_999)
    if count is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of 1 or more")
    return count


# --- A restart keeps the room: --store FILE, in SQLite -----------------------------------


class StoredRoom(Room):
    """The room, with its history kept in an SQLite file too (--store FILE): ids, the room
    id, the kept messages and their refs survive a restart, so pages resume as if nothing
    happened.

    Clients are still served from the history in memory. The file is written by a thread of
    its own (HistoryFile), so the event loop never waits for the disk; a message is
    delivered, and its 201 sent, once that thread has it on disk. So a crash loses only
    messages nobody was told were stored (the page sends them again, with their ref). Ids
    are given here, in the loop, and the thread writes in that order and answers in it.
    """

    def __init__(self, history, loop, ws_port, path):
        super().__init__(history, loop, ws_port)
        self.file = HistoryFile(path, history, self.on_disk)
        self.room_id, self.guests, kept = self.file.open(self.room_id)
        for message in kept:
            self.deliver(message)  # to nobody yet: it keeps the message and its ref
        self.next_id = self.last_id + 1  # given to the next post; last_id is the last delivered
        self.writing = {}  # ref -> the future of its message, on its way to the disk

    async def post(self, name, text, ref=None):
        """Room.post(), delivering once the message is on disk."""
        if ref in self.refs:
            return self.refs[ref], False
        if ref is not None and ref in self.writing:  # sent again before the first was on disk
            return await asyncio.shield(self.writing[ref]), False
        message = {
            "type": "message",
            "id": self.next_id,
            "name": name,
            "text": text,
            "ts": utc_now(),
        }
        if ref is not None:
            message["ref"] = ref
        self.next_id += 1
        written = self.loop.create_future()
        if ref is not None:
            self.writing[ref] = written
        self.file.write(message, self.guests, (message, written))
        return await asyncio.shield(written), True  # shield: the delivery happens regardless

    def on_disk(self, written, error):
        """Called by the writer thread with what it wrote, in id order; delivers in the loop,
        in the same order."""
        self.loop.call_soon_threadsafe(self.deliver_written, written, error)

    def deliver_written(self, written, error):
        if error:
            log.error("--store: cannot write messages: %s", error)
        for message, answer in written:
            self.writing.pop(message.get("ref"), None)  # from now on, self.refs has it
            if error:
                answer.set_exception(
                    RoomUnavailable("the chat cannot store messages right now: try again soon")
                )
            else:
                answer.set_result(self.deliver(message))

    async def close(self):
        """Waits for the writes under way: the servers stopped first, so no post comes."""
        self.file.close()


log = logging.getLogger("chat")


class HistoryFile:
    """The kept messages in an SQLite file, written by one thread, in order.

    Whatever waits when the thread is ready is written in one transaction. WAL with
    synchronous=NORMAL: a committed transaction is in the file, so it survives the chat's
    process however it ends (kill -9 too); it reaches the disk itself at the next checkpoint,
    so a power cut or a crash of the whole machine may lose the last ones. synchronous=FULL
    would wait for the disk (fsync) at every commit: here 1.3 ms at the median but 86 ms at
    the 99th percentile, and every message would wait for that before it is delivered.
    The file keeps --history messages, like the room (and up to TRIM_EVERY more between
    trims); an exclusive lock keeps a second chat.py from writing it too.
    """

    BATCH = 1000  # messages at most in one INSERT (SQLite takes up to 32,766 values)
    TRIM_EVERY = 100  # messages: the file holds up to --history + 100 between trims
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS room (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS messages (
            id INTEGER PRIMARY KEY, name TEXT NOT NULL, text TEXT NOT NULL, ts TEXT NOT NULL,
            ref TEXT
        );
    """

    def __init__(self, path, history, on_written):
        self.path, self.history = path, history
        self.on_written = on_written  # called by the writer with [what write() had], error
        self.waiting = queue.SimpleQueue()  # (message, guests, what to hand back), None to stop
        self.writer = threading.Thread(target=self.write_all, name="store")

    def open(self, new_room_id):
        """The room id (new_room_id for a new file), the guest count, the kept messages."""
        try:
            self.db = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
            for pragma in (
                "locking_mode = EXCLUSIVE",
                "journal_mode = WAL",
                "synchronous = NORMAL",
            ):
                self.db.execute(f"PRAGMA {pragma}")
            self.db.executescript(self.SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO room VALUES ('id', ?)", (new_room_id,))
            room = dict(self.db.execute("SELECT key, value FROM room"))
            rows = self.db.execute(
                "SELECT * FROM (SELECT id, name, text, ts, ref FROM messages"
                " ORDER BY id DESC LIMIT ?) ORDER BY id",
                (self.history,),
            ).fetchall()
        except sqlite3.Error as error:
            self.close()
            raise RoomUnavailable(f"cannot use --store {self.path}: {store_error(error)}") from None
        self.guests_written = int(room.get("guests", 0))
        self.writer.start()
        return room["id"], self.guests_written, [stored_message(*row) for row in rows]

    def write(self, message, guests, handle):
        """From the loop: write soon, then hand `handle` back to on_written() with the others
        of its batch, and None, or the error if it failed."""
        self.waiting.put((message, guests, handle))

    def write_all(self):
        """The writer thread."""
        while True:
            batch = [self.waiting.get()]
            while len(batch) < self.BATCH and not self.waiting.empty():
                batch.append(self.waiting.get())
            stopping = batch[-1] is None  # close() comes after every write
            if stopping:
                batch.pop()
            if batch:
                error = self.write_batch(batch)
                self.on_written([handle for _, _, handle in batch], error)
            if stopping:
                return

    def write_batch(self, batch):
        """One INSERT of the whole batch, its own transaction; None, or the error that undid it.

        One statement, not BEGIN, INSERT, COMMIT: each lets go of Python's GIL and takes it
        back from the busy event loop, and on a loaded machine each of those hand-offs can
        cost the loop a time slice."""
        messages, guests = [message for message, _, _ in batch], batch[-1][1]
        rows = [(m["id"], m["name"], m["text"], m["ts"], m.get("ref")) for m in messages]
        try:
            self.db.execute(
                "INSERT INTO messages VALUES " + ", ".join(["(?, ?, ?, ?, ?)"] * len(rows)),
                [value for row in rows for value in row],
            )
        except sqlite3.Error as error:
            return error
        with contextlib.suppress(sqlite3.Error):  # the messages are kept: these can wait
            if messages[-1]["id"] % self.TRIM_EVERY < len(messages):  # once in a while
                # Ids have no gaps but after a failed write: this keeps --history at most.
                self.db.execute(
                    "DELETE FROM messages WHERE id <= ?", (messages[-1]["id"] - self.history,)
                )
            if guests != self.guests_written:
                self.db.execute("INSERT OR REPLACE INTO room VALUES ('guests', ?)", (str(guests),))
                self.guests_written = guests
        return None

    def close(self):
        if self.writer.is_alive():
            self.waiting.put(None)
            self.writer.join()  # the writes under way take milliseconds
        if hasattr(self, "db"):
            self.db.close()


def stored_message(id, name, text, ts, ref):
    """A row of the file as the message the room sends (the same keys, in the same order)."""
    message = {"type": "message", "id": id, "name": name, "text": text, "ts": ts}
    if ref is not None:
        message["ref"] = ref
    return message


def store_error(error):
    if "locked" in str(error):
        return "it is in use (is another chat.py running with it?)"
    return str(error)


# Names belong to people: what a name may hold (skip on a first reading) ..................

# Format characters (Unicode Cf) draw nothing and change how what follows them is drawn:
# U+202E reverses the rest of the line, U+200B is a name of nothing. Only the joiners stay,
# inside a word: Persian needs U+200C, emoji such as 👩‍💻 need U+200D.
JOINERS = "\u200c\u200d"
# Draw nothing, though Unicode does not call them format characters: fillers and a blank,
# which make "bob" and "bob\u3164" two names that look the same.
BLANKS = "\u115f\u1160\u3164\uffa0\u2800\u17b4\u17b5"
# Combining marks pile up above or below the letter before them: 31 drew over the messages
# next to the name. A few in a row are real writing, after NFC: Thai needs 2, pointed
# Hebrew and Tibetan stacks 3.
MAX_MARKS = 3


def check_format_characters(name):
    for i, c in enumerate(name):
        if unicodedata.category(c) != "Cf" and c not in BLANKS:
            continue
        inside_a_word = 0 < i < len(name) - 1 and not any(
            n.isspace() or unicodedata.category(n) == "Cf" for n in (name[i - 1], name[i + 1])
        )
        if c not in JOINERS or not inside_a_word:
            raise BadInput(
                f"name has an invisible format character (U+{ord(c):04X}, "
                f"{unicodedata.name(c, 'unnamed')}): bidi controls and the like are not allowed"
            )


def is_invisible(c):
    """True if the character draws nothing by itself (a mark needs a letter to sit on)."""
    return c.isspace() or unicodedata.category(c) in ("Cf", "Mn", "Me", "Mc")


def longest_run_of_marks(name):
    run = longest = 0
    for c in name:
        run = run + 1 if unicodedata.category(c) in ("Mn", "Me") else 0
        longest = max(longest, run)
    return longest


def name_key(name):
    """What makes two names the same name to people: "Bob", "BOB" and "ｂｏｂ" are one,
    and so are "bob" and "b\u200cob" (a joiner shows nothing between two letters)."""
    return unicodedata.normalize("NFKC", name).casefold().translate({ord(c): None for c in JOINERS})


# Who may talk to the chat: one policy for HTTP and websockets (skip on a first reading) ...


class Policy:
    """Who may talk to the chat: one policy for every HTTP request and websocket handshake.

    A server on 127.0.0.1 is not private to its user: every web page that user's browser
    opens can send requests to it. Two attacks follow, and two checks stop them.

    Cross-site writes: a page on any site can submit a form, or a `no-cors` fetch, to
    http://127.0.0.1:8000/messages. The browser sends it (it only hides the answer), and the
    chat would store it. But the browser names the page that sent it in `Origin`: a write
    (or a websocket handshake) whose Origin is not the chat page's own origin is refused.
    Scripts and curl send no Origin, and are served.

    DNS rebinding: a page on rebind.example points its own name at 127.0.0.1 once loaded.
    The browser then takes the chat for rebind.example itself: the same origin, free to read
    and to write. Yet it still sends `Host: rebind.example`. So only names that a stranger
    cannot point elsewhere are served: IP addresses, localhost and *.localhost (browsers
    resolve those themselves), this machine's own name; and the names its operator vouched
    for, with --allow-host and --public-url. Any other Host is refused, naming the fix.
    """

    def __init__(self, http_port=8000, allowed_hosts=(), public_url=None, key=None):
        self.http_port = http_port
        # e.g. https://chat.example.org: the page's origin behind a proxy
        self.public_url = public_url
        self.key = key  # the room key; None where no stranger reaches it (choose_room_key())
        self.names = {"localhost", socket.gethostname().lower(), *allowed_hosts}
        if public_url:
            self.names.add(host_name(urllib.parse.urlsplit(public_url).netloc))

    def refusal(self, host, origin):
        """Why a request is refused, as (status, the header to blame, why); None if it is served.

        Both servers ask this: HTTP for every request (with the Origin of a write only), the
        websocket server for every handshake.
        """
        try:
            reason = self.host_refusal(host)
        except ValueError as error:  # "Host: [" is no host name at all; "Host: a:b" has no port
            return http.HTTPStatus.BAD_REQUEST, "host", str(error)
        if reason:
            return http.HTTPStatus.FORBIDDEN, "host", reason
        reason = self.origin_refusal(origin, host)
        if reason:
            return http.HTTPStatus.FORBIDDEN, "origin", reason
        return None

    def host_refusal(self, host):
        """Why a request that names this Host header is refused; None when it is served."""
        name = host_name(host)
        if not host or name in self.names or name.endswith(".localhost") or is_ip_address(name):
            return None
        return (
            f"this chat does not answer to the host name {name!r}: "
            f"if it is yours, start it with --allow-host {name}"
        )

    def origin_refusal(self, origin, host):
        """Why a write or a handshake from this Origin is refused; None when it is served."""
        if origin is None or same_origin(origin, self.page_origin(host)):
            return None
        return f"a page from {origin[:100]} may not post to this chat: only the chat's own page may"

    def page_origin(self, host):
        """The chat page's own origin: the --public-url, or the browser's Host on the HTTP port."""
        if self.public_url:
            return self.public_url
        return f"http://{url_host(host_name(host))}:{self.http_port}"

    def admits(self, keys):
        """Whether one of the keys a request brings is the room key (always, without one).

        compare_digest takes as long whatever the keys hold: a wrong guess tells nothing about
        how much of it was right.
        """
        if self.key is None:
            return True
        room_key = self.key.encode()
        return any(hmac.compare_digest(key.encode("utf-8", "replace"), room_key) for key in keys)

    def how_to_get_in(self):
        return (
            "this chat needs its room key: open the link the chat printed at start "
            "(its ?key=...), or send Authorization: Bearer KEY"
        )

    def cookie_name(self):
        """Cookies are per host, not per port: named after the page origin's port, two chats on
        one machine keep a cookie each, and processes behind one proxy share one."""
        return f"chat-key-{origin_parts(self.page_origin('localhost'))[2]}"

    def key_cookie(self):
        """The Set-Cookie header that keeps the key in the page's browser.

        HttpOnly: the page's script never sees it. SameSite=Lax: no other site's page sends it
        along in the background (the Origin checks stop those too), but a link to the chat
        clicked on another site still arrives with it after the redirect, where Strict would
        leave it behind. Secure behind https. A session cookie: it goes with the browser.
        """
        cookie = http.cookies.SimpleCookie()
        cookie[self.cookie_name()] = self.key
        morsel = cookie[self.cookie_name()]
        morsel.update({"path": "/", "httponly": True, "samesite": "Lax"})
        morsel["secure"] = bool(self.public_url and self.public_url.startswith("https:"))
        return morsel.OutputString()


policy = Policy()  # the policy of this process; Servers makes it with the real port


def presented_keys(query, authorizations, cookies):
    """The room keys a request brings: ?key= (a link, curl, python -m websockets), the page's
    cookie (a browser's websocket cannot send headers, but it sends the host's cookies), and
    Authorization: Bearer KEY (scripts: not in URLs, so not in logs or history)."""
    keys = urllib.parse.parse_qs(query).get("key", [])
    # A header sent twice comes joined with ", " over HTTP (waitress) and as two on the
    # handshake: no key, no Bearer credential and no cookie holds a comma, so each part counts.
    for authorization in ",".join(authorizations).split(","):
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            keys.append(credentials.strip())
    # Read by hand: http.cookies stops at the first cookie it cannot read (a space or a quote
    # in its value, no "="), and other pages on this host (any port) set cookies too.
    for cookie in re.split("[;,]", ";".join(cookies)):
        name, _, value = cookie.partition("=")
        if name.strip() == policy.cookie_name():
            keys.append(value.strip().strip('"'))
    return keys


@hug.request_middleware(api=api)
def check_http_request(request, response):
    """The policy above, before any route: a foreign Host is refused, and so is a foreign write."""
    is_write = request.method not in ("GET", "HEAD")
    origin = request.get_header("Origin") if is_write else None
    refusal = policy.refusal(request.get_header("Host"), origin)
    if refusal:
        status, header, reason = refusal
        refuse(response, f"{status.value} {status.phrase}", {header: reason})  # "403 Forbidden"


@hug.request_middleware(api=api)
def check_room_key(request, response):
    """Where strangers can reach the chat, only those with the room key get anything but /health
    (for monitors): a JSON 401 that says how to get in, or for the page a page that says it."""
    if policy.key is None or request.path == "/health":
        return
    authorization = request.get_header("Authorization")
    keys = presented_keys(
        request.query_string,
        [authorization] if authorization else [],
        [request.get_header("Cookie") or ""],
    )
    if policy.admits(keys):
        return
    response.set_header("WWW-Authenticate", "Bearer")  # what a 401 must say: how to get in
    if request.path in ("/", "/chat", "/invite"):
        refuse_page(response)
    else:
        refuse(response, "401 Unauthorized", {"key": policy.how_to_get_in()})


KEY_PAGE = """<!doctype html>
<html lang="en"><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>chat: the link, please</title>
<h1>This chat needs its room key</h1>
<p>Open the link the chat printed when it started (it ends in <code>?key=...</code>),
or scan its QR code. Ask the person who runs the chat for it.</p>
</html>
"""


def refuse_page(response):
    """The page's 401: a person who opened the bare address learns how to get in."""
    response.status = "401 Unauthorized"
    response.content_type = "text/html; charset=utf-8"
    response.set_header("Content-Security-Policy", "default-src 'none'")
    response.body = KEY_PAGE
    response.complete = True


def keep_the_key_in_a_cookie(request, response, query):
    """The link's ?key= goes into a cookie, and the browser to the same page without it (303):
    the key stays out of the address bar, the history and a photo of the projector."""
    if policy.admits([value for name, value in query if name == "key"]):  # not the old cookie's
        response.append_header("Set-Cookie", policy.key_cookie())
    rest = urllib.parse.urlencode([(name, value) for name, value in query if name != "key"])
    response.status = hug.HTTP_303
    response.set_header("Location", request.path + (f"?{rest}" if rest else ""))
    return ""


def refuse(response, status, errors):
    """Answer now, with hug's JSON error format: falcon runs no route after this."""
    response.status = status
    response.content_type = "application/json; charset=utf-8"
    response.body = json.dumps({"errors": errors})
    response.complete = True


# Host names and origins (skip on a first reading) ........................................


def host_name(host):
    """The name in a Host header as the checks compare it: "[::1]:8000" gives "::1", and
    "LocalHost.:8000" gives "localhost"; None when there is none. The one reading of a host
    for the Host check and for both sides of the Origin check.

    Names are compared in lower case and without a trailing dot ("localhost." is localhost,
    written as an absolute name). ValueError when the header holds no host name ("[" without
    "]", ":8000", "@"), or a port that is not a number (see host_and_port()).
    """
    if not host:
        return None
    return host_and_port(host)[0].rstrip(".")


# A Host header, or the host of an Origin: a name or an IPv4 address, or an IPv6 address in
# brackets; then maybe a colon and a port, which may be empty ("localhost:" is valid, RFC 3986).
HOST_AND_PORT = re.compile(r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<name>[^\[\]:@/?#,\s]+))(?::(?P<port>.*))?")


def host_and_port(host):
    """A Host header as (name as written, in lower case; port): "[::1]:8000" gives ("::1", 8000),
    "Localhost.:" gives ("localhost.", None).

    ValueError, with what is wrong, when it is no host name or its port is not a number:
    falcon's request.host raised for "localhost:abc" (a 500).
    """
    match = HOST_AND_PORT.fullmatch(host)
    in_brackets = match and match["ipv6"] is not None
    if not match or in_brackets and not (":" in match["ipv6"] and is_ip_address(match["ipv6"])):
        raise ValueError("the Host header is not a host name")
    name = (match["ipv6"] or match["name"]).lower()
    if not name.rstrip("."):  # "." alone
        raise ValueError("the Host header is not a host name")
    port = match["port"]
    if port and not (port.isascii() and port.isdecimal() and int(port) <= 65535):
        raise ValueError("the port in the Host header is not a number from 0 to 65535")
    return name, int(port) if port else None


def url_host(name):
    """A host name as it goes in a URL: an IPv6 address in brackets."""
    return f"[{name}]" if name and ":" in name else name


def is_ip_address(name):
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def same_origin(one, other):
    """Two origins are the same scheme, host and port ("http://a" is "http://a:80")."""
    return origin_parts(one) == origin_parts(other)


def origin_parts(origin):
    """(scheme, host name, port) of an origin, its host read as a Host header is; None if it
    is none ("null", a port that is not a number)."""
    try:
        url = urllib.parse.urlsplit(origin)
        port = host_and_port(url.netloc)[1] or {"http": 80, "https": 443}.get(url.scheme)
        return url.scheme, host_name(url.netloc), port
    except ValueError:
        return None


# Guards of the websocket server, one voice per address (skip on a first reading) .........


def check_request(connection, request, max_clients):
    """Refuse unknown paths (404), a Host or Origin sent twice (400), what the policy refuses
    (403 or 400), a handshake without the room key (401), a full room (503), and an address
    past its share (429); count the rest in."""
    url = urllib.parse.urlsplit(request.path)
    if url.path not in (*ROOM_PATHS, "/echo"):
        return connection.respond(http.HTTPStatus.NOT_FOUND, "No such path: use / or /echo\n")
    for header in ("Host", "Origin"):  # headers.get() raises MultipleValuesError on two (a 500)
        if len(request.headers.get_all(header)) > 1:
            return connection.respond(
                http.HTTPStatus.BAD_REQUEST, f"The {header} header is sent more than once\n"
            )
    refusal = policy.refusal(request.headers.get("Host"), request.headers.get("Origin"))
    if refusal:
        status, _, reason = refusal
        return connection.respond(status, reason + "\n")
    if policy.key and not policy.admits(handshake_keys(request)):
        refused = connection.respond(http.HTTPStatus.UNAUTHORIZED, policy.how_to_get_in() + "\n")
        refused.headers["WWW-Authenticate"] = "Bearer"  # what a 401 must say: how to get in
        return refused
    if is_full(connection.server, max_clients):
        refused = connection.respond(
            http.HTTPStatus.SERVICE_UNAVAILABLE, "The room is full: try again later\n"
        )
        refused.headers["Retry-After"] = str(RETRY_AFTER)  # a place may be free by then
        return refused
    address = voice_of(client_address(connection))
    reason = address_refusal(address)
    if reason:
        refused = connection.respond(http.HTTPStatus.TOO_MANY_REQUESTS, reason + "\n")
        refused.headers["Retry-After"] = "1"
        return refused
    connection.counted_in = room, address  # and counted out when the connection is lost
    room.connected(address)
    return None


def handshake_keys(request):
    """The room keys a handshake brings (see presented_keys())."""
    url, headers = urllib.parse.urlsplit(request.path), request.headers
    return presented_keys(url.query, headers.get_all("Authorization"), headers.get_all("Cookie"))


def address_refusal(address):
    """Why one more websocket from this address is refused; None when it is welcome.

    A join costs every client a presence change: one address connecting in a loop made the
    server send 275 KB/s of them to everyone. A phone that reconnects now and then never
    comes near JOIN_BURST; a loop empties it and then gets JOINS_PER_SECOND.
    """
    if room.connections_from[address] >= MAX_PER_ADDRESS:
        return (
            f"{MAX_PER_ADDRESS} websocket connections from your address are open already: "
            "close one first"
        )
    if not room.join_buckets.take(address):
        return "connecting too often from your address: wait a few seconds"
    return None


def client_address(connection):
    """The address of the client at the other end of a websocket connection.

    Behind the proxy (--public-url) every connection comes from the proxy on 127.0.0.1, so
    the client is the last address that proxy added to X-Forwarded-For, as waitress reads it
    for HTTP (trusted_proxy). From anyone else, or without --public-url, the header is
    ignored: a client cannot pick its own address.
    """
    peer = connection.remote_address[0]
    if policy.public_url and peer == PROXY:
        forwarded = ",".join(connection.request.headers.get_all("X-Forwarded-For"))
        with contextlib.suppress(ValueError):  # none, or no address: the proxy's own then
            return str(ipaddress.ip_address(forwarded.split(",")[-1].strip()))
    return peer


def voice_of(address):
    """What one person's client address is, for the limits per address: an IPv6 address's /64
    (one machine holds a whole /64 and makes up new addresses in it at will), an IPv4 address
    itself, also when written as IPv6 (::ffff:192.0.2.1, from a server bound to ::)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # no address at all (a test's fake client): itself
        return address
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network((ip, 64), strict=False))
    return address


def is_full(server, max_clients):
    """Every websocket connection holds a file descriptor, and so does every HTTP one: the
    cap keeps enough of them for HTTP, /health and the handshakes that refuse the rest."""
    return len(server.all_connections) >= max_clients


class ChatConnection(ServerConnection):
    """A websocket connection that is dropped when MAX_QUEUED bytes wait to be sent to it.

    broadcast() never waits for a slow client, so its frames pile up in memory. asyncio
    calls pause_writing() when the write buffer passes its high-water mark (write_limit in
    Servers.start_websockets()): that client has stopped reading. Dropping it frees the
    buffer; it can come back with since=.
    """

    waiting_for_client = False
    counted_in = None  # the room and client address check_request() counted it under

    def __init__(self, *args, max_connections, handshakes, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.handshakes = handshakes  # the server's connections still in their handshake

    def connection_made(self, transport):
        """Close a TCP connection at once past max_connections (clients and handshakes under
        way): connections that never send a handshake must not take the descriptors that
        HTTP needs. Below it, a handshake past the cap gets a 503 (check_request)."""
        super().connection_made(transport)
        closing = self.server.close_task is not None  # see close_websockets()
        if len(self.server.handler_tasks) > self.max_connections or closing:
            transport.abort()
        else:
            self.handshakes.add(self)

    async def handshake(self, *args, **kwargs):
        try:
            await super().handshake(*args, **kwargs)
        finally:
            self.handshakes.discard(self)

    def connection_lost(self, exc):
        """However it ends (a handshake refused later, a close, a lost network), count it out."""
        self.handshakes.discard(self)
        super().connection_lost(exc)
        if self.counted_in:
            counted_room, address = self.counted_in
            counted_room.disconnected(address)
            self.counted_in = None

    def pause_writing(self):
        super().pause_writing()
        if not self.waiting_for_client:
            self.transport.abort()

    @contextlib.contextmanager
    def catching_up(self):
        """While the history is sent, wait for the client instead of dropping it.

        A client catching up is behind by design. A write limit of 0 makes every
        `await connection.send()` wait until the kernel has taken all of it: the server
        holds one piece at most, and when the last one is written (in Room.join, with
        no wait) nothing else is queued.
        """
        self.waiting_for_client = True
        self.transport.set_write_buffer_limits(high=0)
        try:
            yield
        finally:
            self.transport.set_write_buffer_limits(self.write_limit_high, self.write_limit_low)
            self.waiting_for_client = False

    async def send_in_time(self, frame):
        """Send, and wait until the client has taken it, for PING_TIMEOUT at most.

        A client that stops reading in the middle of its history is dropped, as one that
        stops answering pings is: websockets' own pings wait behind the history.
        """
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                await self.send(frame)
        except TimeoutError:
            self.transport.abort()
            raise


# read_frame()'s reason for a frame that json.loads() refuses for a limit


def json_limit(error):
    """What a JSON text that json.loads() refuses for a limit, not for its syntax, is past."""
    if isinstance(error, RecursionError):
        return "it is nested too deep"
    return f"a number has more than {sys.get_int_max_str_digits()} digits"


# Sending one frame to everyone: a prepared frame (skip on a first reading) ...............


def send_prepared(connections, text):
    """websockets.broadcast(), with the frame serialized once for everyone instead of per client.

    Only clients mask their frames; a server's are not masked, so a text frame's bytes are the
    same for every client. broadcast() builds a Frame, its header and a copy of the text for
    each connection; here the bytes are made once and written to every transport (Go's
    gorilla/websocket calls this a PreparedMessage). A connection that cannot take them goes to
    broadcast() itself, which skips it or compresses for it exactly as it always did.
    transport.write() is where broadcast() ends too, so a client that stops reading still trips
    pause_writing() and ChatConnection drops it.
    """
    frame = prepared_frame(text)
    for connection in connections:
        if takes_prepared_frame(connection):
            connection.transport.write(frame)
        else:
            broadcast([connection], text)


def prepared_frame(text):
    """The bytes protocol.send_text() makes on a server: one unmasked, final text frame."""
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=False)


def takes_prepared_frame(connection):
    """Open, not half-way through sending a fragmented message, no extension, transport not closing.

    The checks broadcast() and protocol.send_text() make, read from websockets 17 internals:
    protocol.state (a closing connection has sent its close frame: nothing may follow it),
    connection.send_in_progress and protocol.expect_continuation_frame (a frame between two
    fragments would break the message), protocol.extensions (compression makes other bytes for
    each connection). And the transport: ChatConnection aborts a slow reader's before the
    connection knows; asyncio would drop the bytes, uvloop would raise, broadcast() copes.
    websockets writes its own frames to the transport as soon as it makes them, so none can be
    waiting to go out before ours. A renamed attribute fails every test; a changed meaning fails
    the tests under "Prepared frames" in test_chat.py.
    """
    protocol = connection.protocol
    return (
        protocol.state is State.OPEN
        and connection.send_in_progress is None
        and not protocol.expect_continuation_frame
        and not protocol.extensions
        and not connection.transport.is_closing()
    )


# Limits with headroom: file descriptors (skip on a first reading) ........................


def raise_fd_limit():
    """Raise this process's descriptor limit to the most it may have; return the limit.

    Each connection, websocket or HTTP, holds a descriptor; a shell often starts programs
    with 1024 while allowing far more. Out of them, accept() fails for both servers.
    """
    if resource is None:
        return 1024  # what connection_limits() should plan for where it cannot ask
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = 1024 * 1024 if hard == resource.RLIM_INFINITY else hard  # Linux's fs.nr_open
    for limit in (ceiling, min(ceiling, 10240)):  # macOS refuses more than OPEN_MAX, 10240
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            return limit
        except (ValueError, OSError):
            pass
    return soft


def connection_limits(fd_limit):
    """How many connections fit in `fd_limit` descriptors, with headroom: HTTP connections,
    websocket clients, and websocket connections at all (clients and handshakes under way).

    An HTTP connection may need a second descriptor (waitress spools a response over 1 MB
    to a temporary file). What is left after HTTP and FD_RESERVED is for websockets, a
    tenth of it (at least 10) for handshakes beyond the cap, which get their 503.
    """
    http_connections = max(10, min(HTTP_CONNECTIONS, fd_limit // 8))
    websockets = max(2, fd_limit - FD_RESERVED - 2 * http_connections)
    max_clients = max(1, min(MAX_CLIENTS, websockets * 9 // 10))
    return http_connections, max_clients, min(websockets, max_clients + max(10, max_clients // 10))


# The same error logged once (skip on a first reading) ....................................


class OncePerInterval(logging.Filter):
    """Lets each log message through once every LOG_EVERY seconds.

    When descriptors run out, accept() fails at once each time it is tried: waitress and
    asyncio then log a traceback per try, megabytes a second, which helps nobody.
    """

    def __init__(self):
        super().__init__()
        self.last_logged = {}

    def filter(self, record):
        now, key = time.monotonic(), (record.name, record.msg)
        if now - self.last_logged.get(key, float("-inf")) < LOG_EVERY:
            return False
        self.last_logged[key] = now
        return True


ONCE_PER_INTERVAL = OncePerInterval()


def log_repeated_errors_once():
    """A logger's filter sees only what is logged to that logger, not to its children: so
    "waitress.queue" too, whose "Task queue depth is 1" came with every request that waited
    a moment for one of waitress's threads (many a second in a busy room)."""
    for name in ("waitress", "waitress.queue", "asyncio", "websockets.server"):
        logging.getLogger(name).addFilter(ONCE_PER_INTERVAL)  # adding it again changes nothing


# hug workarounds: reading request bodies, HEAD (skip on a first reading) .................


def read_utf8(body):
    """Bodies are UTF-8. hug's readers trust the header's charset, even a bogus one (a 500)."""
    try:
        return body.read().decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("the body is not valid UTF-8") from None


@hug.default_input_format("application/json", api=api)
def read_json(body, **_header_params):
    try:
        return without_nulls(json.loads(read_utf8(body)))
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise BadInput(f"the body is not valid JSON: {error}") from None


@hug.default_input_format("application/x-www-form-urlencoded", api=api)
def read_form(body, **_header_params):
    """hug's own form reader also splits "text=a,b" into a list."""
    return parse_query_string(read_utf8(body), keep_blank=True, csv=False)


@hug.default_input_format("text/plain", api=api)
def read_text(body, **_header_params):
    return read_utf8(body)


@hug.default_input_format("multipart/form-data", api=api)
def read_multipart(body, content_length, boundary=None):
    """What an HTML form with enctype="multipart/form-data" posts; hug's reader is a 500
    without a boundary (KeyError) or with an empty one (ValueError), and it replaces bad
    UTF-8 with "\ufffd" where the other readers refuse it."""
    if not boundary:
        raise BadInput("the multipart body has no valid boundary")
    limits = {"boundary": boundary.encode(), "CONTENT-LENGTH": str(content_length)}
    try:
        form = parse_multipart(body.stream, limits, errors="strict")
    except UnicodeDecodeError:
        raise BadInput("the body is not valid UTF-8") from None
    except ValueError:
        raise BadInput("the multipart body has no valid boundary") from None
    return {key: values[0] if len(values) == 1 else values for key, values in form.items()}


READABLE = (
    "application/json",
    "application/x-www-form-urlencoded",
    "text/plain",
    "multipart/form-data",
)


@hug.request_middleware(api=api)
def refuse_unreadable_bodies(request, response):
    """hug drops a body it has no reader for and the client hears only that `text` is
    missing: say instead which types the chat reads (415)."""
    content_type = (request.content_type or "").split(";")[0].strip().lower()
    if request.content_length and content_type not in READABLE:
        refuse(
            response, hug.HTTP_415, {"body": f"Content-Type must be one of: {', '.join(READABLE)}"}
        )


# Bodies' parameters (RFC 2046): what a boundary may be, so that it can go back in quotes.
BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")


@hug.request_middleware(api=api)
def give_readers_only_the_media_type(request, response):
    """hug looks up a body's reader by the Content-Type as sent, and "APPLICATION/JSON" had
    none: media types are case-insensitive. And it passes the header's parameters to the
    reader as keyword arguments: "; body=x" was a TypeError (a 500). So the readers see the
    media type in lower case and, for a multipart body, its boundary; nothing else (the
    charset says nothing: bodies are UTF-8, see read_utf8())."""
    if request.content_type is None:
        return
    media_type, parameters = parse_content_type(request.content_type)
    request.content_type = media_type.strip().lower()
    boundary = parameters.get("boundary", "")
    if request.content_type == "multipart/form-data" and BOUNDARY.fullmatch(boundary):
        request.content_type += f'; boundary="{boundary}"'


@hug.middleware_class(api=api)
class AnswerHeadAsGet:
    """HEAD is answered as GET, without the body, on every route (`curl -I` works).

    hug's routes take only the methods they name, so HEAD was a 405. And for HEAD falcon
    leaves out the body and its Content-Length: waitress then sends the empty body of the
    chunked encoding, `0\r\n\r\n`, which an answer to HEAD must not have. So the route runs
    as for a GET, and the answer keeps GET's Content-Length and loses only the body.
    """

    def process_request(self, request, response):
        if request.method == "HEAD":
            request.method = "GET"

    def process_response(self, request, response, resource, succeeded):
        allowed = (response.get_header("Allow") or "").split(", ")
        if "GET" in allowed:  # the answer to OPTIONS, and a 405
            response.set_header("Allow", ", ".join([*allowed, "HEAD"]))
        if request.env["REQUEST_METHOD"] == "HEAD":
            request.method = "HEAD"  # falcon sends no body then
            body = response.body if response.body is not None else response.data or b""
            response.content_length = len(body.encode() if isinstance(body, str) else body)


if __name__ == "__main__":
    sys.exit(main())
