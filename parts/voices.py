"""One voice per client address: rate buckets, per-address caps, and the websocket server's
guards.

Guarantees: Buckets remembers at most MAX_ADDRESSES addresses (the least recently used is
forgotten), so no stranger can grow it without bound. check_request() lets a handshake in only
on a known path, with one Host and one Origin the Policy accepts, the room key where there is
one, a place in the room, and an address within its share; it counts each one in, and
ChatConnection counts it out however it ends. A client that stops reading is dropped once
MAX_QUEUED bytes wait for it (but while it catches up on its history, when it is waited for, up
to its ping timeout). voice_of() makes one person of an IPv6 /64.
"""

import asyncio
import contextlib
import http
import ipaddress
import time
import urllib.parse

from websockets.asyncio.server import ServerConnection

from parts.access import client_address, handshake_keys
from parts.errors import RETRY_AFTER

MAX_PER_ADDRESS = 100  # websocket connections open at once from one address: an office's NAT fits
JOIN_BURST, JOINS_PER_SECOND = 100, 2  # handshakes one address may make at once, then a second
MAX_ADDRESSES = 10_000  # addresses whose buckets the room remembers; the least recent is forgotten


class TokenBucket:
    """`burst` at once, then `per_second` a second: a person never notices, a script does."""

    def __init__(self, burst, per_second):
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


def check_request(connection, request, *, room, policy, paths, max_clients):
    """Refuse unknown paths (404), a Host or Origin sent twice (400), what the policy refuses
    (403 or 400), a handshake without the room key (401), a full room (503), and an address
    past its share (429); count the rest in."""
    url = urllib.parse.urlsplit(request.path)
    if url.path not in paths:
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
    if policy.key and not policy.admits(handshake_keys(request, policy.cookie_name())):
        refused = connection.respond(http.HTTPStatus.UNAUTHORIZED, policy.how_to_get_in() + "\n")
        refused.headers["WWW-Authenticate"] = "Bearer"  # what a 401 must say: how to get in
        return refused
    if is_full(connection.server, max_clients):
        refused = connection.respond(
            http.HTTPStatus.SERVICE_UNAVAILABLE, "The room is full: try again later\n"
        )
        refused.headers["Retry-After"] = str(RETRY_AFTER)  # a place may be free by then
        return refused
    address = voice_of(client_address(connection, policy))
    reason = address_refusal(room, address)
    if reason:
        refused = connection.respond(http.HTTPStatus.TOO_MANY_REQUESTS, reason + "\n")
        refused.headers["Retry-After"] = "1"
        return refused
    connection.address = address
    connection.counted_in = room, address  # and counted out when the connection is lost
    room.connected(address)
    return None


def address_refusal(room, address):
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
    address = None  # the client's address as the limits count it: voice_of(), check_request()
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
        """Send, and wait until the client has taken it, for the ping timeout at most.

        A client that stops reading in the middle of its history is dropped, as one that
        stops answering pings is: websockets' own pings wait behind the history.
        """
        try:
            async with asyncio.timeout(self.ping_timeout):
                await self.send(frame)
        except TimeoutError:
            self.transport.abort()
            raise
