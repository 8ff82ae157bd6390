"""One voice per client address: rate buckets, per-address caps, and the websocket server's
guards.

Guarantees: Buckets remembers at most MAX_ADDRESSES addresses (the least recently used is
forgotten), so no stranger can grow it without bound. check_request() lets a handshake in only
on a known path, with one Host and one Origin the Policy accepts, the room key where there is
one, a place in the room, and an address within its share; it counts each one in, and
ChatConnection counts it out however it ends. A client that stops reading is dropped once
MAX_QUEUED bytes wait for it (but while it catches up on its history, when it is waited for, up
to its ping timeout); the kernel holds at most about twice SEND_BUFFER for it, and nothing once
it is dropped. Turns lets one address catch up on CATCHING_UP_PER_ADDRESS connections at once,
each waiting CATCH_UP_WAIT at most for its turn. voice_of() makes one person of an IPv6 /64, but of an address on one of
this machine's own networks (its LAN) as of an IPv4 address: the address itself. A path that is
no URL path is a 400, never a 500.
"""

import asyncio
import collections
import contextlib
import http
import ipaddress
import math
import socket
import struct
import time
import urllib.parse
from pathlib import Path

from websockets.asyncio.server import ServerConnection

from parts.access import client_address, handshake_keys
from parts.errors import RETRY_AFTER

try:  # Unix: the send queue is read with ioctl
    import fcntl
    import termios
except ImportError:  # Windows
    fcntl = termios = None

MAX_PER_ADDRESS = 100  # websocket connections open at once from one address: an office's NAT fits
JOIN_BURST, JOINS_PER_SECOND = 100, 2  # handshakes one address may make at once, then a second
MAX_ADDRESSES = 10_000  # addresses whose buckets the room remembers; the least recent is forgotten
CATCHING_UP_PER_ADDRESS = 4  # connections of one address sent a long history at once; others wait
CATCH_UP_WAIT = 20  # seconds one waits for its turn at most; then it is closed, and comes back
SEND_BUFFER = 128 * 1024  # bytes of the kernel's send buffer per websocket (Linux doubles it)
NETWORKS_EVERY = 10  # seconds; this machine's own networks are read again after this time


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


class Turns:
    """At most `size` holders of a turn per key at once; the others wait for one, in order,
    `within` seconds at most.

    A key's semaphore is made for its first holder or waiter and forgotten with its last,
    so the keys remembered are only those in use now.
    """

    def __init__(self, size, within):
        self.size, self.within = size, within
        self.semaphores = {}  # key -> asyncio.Semaphore(size)
        self.users = collections.Counter()  # key -> its holders and waiters

    @contextlib.asynccontextmanager
    async def turn(self, key):
        """Hold one of `key`'s turns for the block; TimeoutError if none is free in time."""
        semaphore = self.semaphores.setdefault(key, asyncio.Semaphore(self.size))
        self.users[key] += 1
        try:
            async with asyncio.timeout(self.within):
                await semaphore.acquire()
            try:
                yield
            finally:
                semaphore.release()
        finally:
            self.users[key] -= 1
            if not self.users[key]:
                del self.users[key], self.semaphores[key]


def check_request(connection, request, *, room, policy, paths, max_clients):
    """Refuse a path that is no URL path (400), unknown paths (404), a Host or Origin sent
    twice (400), what the policy refuses (403 or 400), a handshake without the room key (401),
    a full room (503), and an address past its share (429); count the rest in."""
    try:
        url = urllib.parse.urlsplit(request.path)
    except ValueError:  # "//[x" reads as a host, an IPv6 address never closed
        return connection.respond(http.HTTPStatus.BAD_REQUEST, "The path is not a URL path\n")
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
    """What one person's client address is, for the limits per address: an IPv4 address itself,
    also when written as IPv6 (::ffff:192.0.2.1); an IPv6 address on one of this machine's own
    networks itself too (a LAN: the laptops of a workshop share its /64); any other IPv6
    address its /64 (one machine holds a whole /64 and makes up new addresses in it at will)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # no address at all (a test's fake client): itself
        return address
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    if ip.version == 6 and ip not in own_networks:
        return str(ipaddress.ip_network((ip, 64), strict=False))
    return str(ip)


class OwnNetworks:
    """This machine's IPv6 networks of a /64 or longer, as its interfaces have them: `ip in
    own_networks` is whether a client is on the same link as the chat (its LAN).

    A shorter prefix on one link (a hosting provider's /48) is shared with strangers, so
    it does not count. Read from /proc/net/if_inet6 (Linux), again at most every
    NETWORKS_EVERY seconds, as a laptop joins another network; elsewhere there are none,
    and every IPv6 client counts as its /64.
    """

    def __init__(self, path="/proc/net/if_inet6"):
        self.path = path
        self.networks, self.read_at = (), -math.inf

    def __contains__(self, ip):
        if time.monotonic() - self.read_at > NETWORKS_EVERY:
            self.networks, self.read_at = self.read(), time.monotonic()
        return any(ip in network for network in self.networks)

    def read(self):
        """Each line: the address in 32 hex digits, the interface's index, the prefix length
        in hex, its scope, its flags, the interface's name."""
        try:
            lines = Path(self.path).read_text().splitlines()
        except OSError:  # not Linux
            return ()
        networks = set()
        for line in lines:
            address, _, prefix, *_ = line.split()
            if int(prefix, 16) >= 64:
                ip = ipaddress.IPv6Address(int(address, 16))
                networks.add(ipaddress.IPv6Network((ip, int(prefix, 16)), strict=False))
        return tuple(networks)


own_networks = OwnNetworks()  # this machine's, for every server in the process


def discard_what_is_unsent(transport):
    """Make the socket's close a reset when the kernel still holds bytes the client never took.

    Closing a socket does not free its send queue: the kernel keeps the socket, orphaned, to
    deliver the queue and then a FIN, and a client that reads nothing holds it there for
    minutes (FIN-WAIT-1): up to twice SEND_BUFFER per connection the chat has already
    dropped, and the client can come straight back and hold more. SO_LINGER with a time of 0
    makes the close a reset (RST) that frees the queue at once. After a closing handshake the
    client has taken everything, the queue is empty, and the close stays a FIN.

    asyncio closes the socket right after connection_lost() returns, so the option set here
    applies to that close. The queue is read with TIOCOUTQ (SIOCOUTQ for a socket), on Linux.
    """
    if fcntl is None:  # Windows: no ioctl; the queue stays the kernel's to send
        return
    with contextlib.suppress(OSError, AttributeError):  # already closed, or not a TCP socket
        sock = transport.get_extra_info("socket")
        unsent = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
        if struct.unpack("i", unsent)[0]:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


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
        HTTP needs. Below it, a handshake past the cap gets a 503 (check_request).

        And cap what the kernel holds for it: it takes up to net.ipv4.tcp_wmem's maximum
        (4 MB on Linux) from a client that reads nothing, past asyncio's write limit, and an
        empty write buffer does not mean the client took the bytes. SO_SNDBUF caps it at
        twice SEND_BUFFER (Linux counts its own overhead in), and turns off its autotuning.
        """
        super().connection_made(transport)
        with contextlib.suppress(OSError):  # a connection already gone: nothing to hold
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
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
        """However it ends (a handshake refused later, a close, a lost network), count it out,
        and let the kernel drop what the client never took."""
        self.handshakes.discard(self)
        discard_what_is_unsent(self.transport)
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
