"""The chat's HTTP server: waitress, guarded so that no client holds what others need.

waitress reads requests in one I/O thread and answers them in a few worker threads (the
chat's 4). `create()` makes a waitress server that guarantees, whatever one client does:

- **A worker never waits for a client.** A connection's next request is read only once the
  answer to the one before has left for the kernel: no read-ahead of pipelined requests. So
  a connection has at most one answer in the server, and one answer (1000 messages at most,
  under 13 MB) stays below waitress's `outbuf_high_watermark` (16 MiB), the only point where
  a worker waits for its client to read. A client that sends many requests and reads nothing
  costs a descriptor and one answer, not a thread. (waitress parses every request of a read
  at once and answers them one after the other; 4 such clients held all 4 workers, and every
  route, `/health` too, stopped answering.)
- **What one connection holds is bounded**: one answer in waitress's buffer (in memory up to
  `outbuf_overflow`, 1 MB, the rest in a temporary file), and SEND_BUFFER in the kernel,
  which would otherwise take up to 4 MB (`net.ipv4.tcp_wmem`) from a client that reads
  nothing: 100 such connections held 312 MB of the kernel's memory, now 46 MB.
- **A connection that takes nothing for `channel_timeout` seconds is closed**, also when
  the kernel's buffer for it is full. waitress only marks such a connection, to be closed on
  its next write, which a client that reads nothing never allows. A connection closed with
  an answer left unsent is reset (SO_LINGER 0): a plain close would leave the kernel holding
  its unsent bytes, up to 2 x SEND_BUFFER, for minutes after (FIN-WAIT-1), and a client
  that comes back for more piled up hundreds of MB. A connection closed after a whole answer
  keeps its graceful close.
- **What one address holds in answers not yet taken is bounded**: its connections' requests
  are answered ANSWERS_AT_ONCE at a time, and the next one is parsed only while its
  connections hold less than HELD_PER_ADDRESS of answers unsent; past it, its requests wait
  unread until the answers before them leave or their connections close. 100 connections of
  one address that each asked for the longest answer and read nothing held 1.2 GB.
- **Idle connections never lock others out**: when all `connection_limit` connections are
  open, a new one takes the place of the connection idle the longest with no request being
  answered, as a cache evicts; its browser opens another when it needs one, as it does after
  channel_timeout. Only when every connection has a request being answered is the new one
  closed. (waitress stops accepting instead: 10 addresses of 100 idle connections each took
  every place, and `/health` from anyone else timed out.)
- **One client address holds at most `per_address` connections**: MAX_CONNECTIONS_PER_ADDRESS
  (100), or half of `connection_limit` when that is lower, so one address never has them all.
  A connection past that is closed as soon as it is accepted, before anything is read; other
  addresses are served. Connections from the trusted proxy (`trusted_proxy`, with
  --public-url) are not capped: every client comes through it, the proxy keeps its own
  limits per client, and waitress's `connection_limit` still holds.
- **A request target urllib cannot split is a 400**, as waitress answers other unreadable
  requests: `GET http://[::1` (an IPv6 host without its `]`, or not an address) made waitress's
  parser raise in its I/O thread, log "uncaptured python exception" and close the connection
  without an answer.
"""

import contextlib
import fcntl
import socket
import struct
import termios
import time

import waitress.adjustments
import waitress.channel
import waitress.parser
import waitress.server

# An office behind one NAT address, or a workshop on one Wi-Fi behind one: a browser keeps 1
# or 2 connections to the chat for its page, /config and posts (up to 6 while loading), idle
# ones for channel_timeout (30 s). As many as the websocket room lets in from one address
# (100): a script that opens 1,000 does not take everyone's places.
MAX_CONNECTIONS_PER_ADDRESS = 100

# Bytes of answers the kernel holds for one connection (it counts twice that, SO_SNDBUF's
# bookkeeping included). 512 KB in flight fill a LAN, and the loopback to a proxy; measured on
# loopback, GET /messages?limit=1000 cost the same CPU and time with it as without.
SEND_BUFFER = 256 * 1024

# Bytes of answers one address's connections may hold unsent before its next request waits
# unread. The answers its workers are writing come on top (ANSWERS_AT_ONCE of 12.2 MB at
# most), so an address holds 41 MB at most, where 100 connections held 1.2 GB. Above the
# longest answer: a client that reads slowly never waits for its own answer.
HELD_PER_ADDRESS = 16 * 1024 * 1024

# Requests of one address answered at once: half of waitress's 4 workers, so that one
# address never has them all, and the others answer everyone else.
ANSWERS_AT_ONCE = 2

# SO_LINGER on, for 0 s: close() discards what is unsent and resets the connection.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)


def create(app, host, port, map=None, address_of=str, **settings):
    """A waitress server for `app` on host and port, with the guards above; run() serves.

    As waitress.create_server(): `map` is the socket map its I/O loop serves, `settings` are
    waitress's (waitress.adjustments.Adjustments), and a host or port it cannot read raises
    ValueError. `address_of(ip)` says which client address an IP counts as (say an IPv6
    address's /64).
    """
    adj = waitress.adjustments.Adjustments(host=host, port=port, **settings)
    # A name may resolve to several addresses; the chat serves the first, and reads its port.
    return GuardedServer(app, map=map, adj=adj, sockinfo=adj.listen[0], address_of=address_of)


class RequestParser(waitress.parser.HTTPRequestParser):
    """waitress's parser, with a request target urllib.parse.urlsplit() refuses a ParsingError
    (a 400): waitress catches only its UnicodeError, not the ValueError of a broken IPv6 host."""

    def parse_header(self, header_plus):
        try:
            super().parse_header(header_plus)
        except ValueError as error:
            raise waitress.parser.ParsingError(f"Bad URI: {error}") from None


class OneRequestAtATime(waitress.channel.HTTPChannel):
    """An HTTP connection that parses its next request only once the last answer has left."""

    parser_class = RequestParser
    unread = b""  # what a read brought past one whole request (recv_bytes, 8 KB, at most)

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map)
        self.client = server.address_of(addr[0])
        if not server.admits(self):
            self.logger.warning(
                "refused an HTTP connection: %d are open from its address already",
                server.per_address,
            )
            self.handle_close()  # before a byte is read or written: the cheapest refusal
        else:
            server.make_room(self)

    def received(self, data):
        """waitress's received(), but it stops at the end of the first whole request: the
        rest waits in self.unread, unparsed, until that request's answer has left."""
        with self.requests_lock:
            if self.will_close or self.close_when_flushed:
                return False
            while data and not self.requests and self.server.may_answer(self):
                if self.request is None:
                    self.request = self.parser_class(self.adj)
                data = data[self.request.received(data) :]
                if (
                    self.request.expect_continue
                    and self.request.headers_finished
                    and not self.sent_continue
                ):
                    self.send_continue()
                if self.request.completed:
                    self.sent_continue = False
                    if not self.request.empty:  # a blank line between requests is no request
                        self.requests.append(self.request)
                        self.server.answering(self)
                        self.server.add_task(self)
                    self.request = None
            self.unread = data
        return True

    def readable(self):
        # waitress reads when no request is being answered and no answer waits to be sent;
        # what was read and is not parsed yet goes first.
        return super().readable() and not self.unread

    def writable(self):
        # Also when the next request is ready to be parsed: handle_write() does it, in the
        # I/O thread, as soon as the kernel takes more for this client.
        return super().writable() or self.ready_for_next()

    def handle_write(self):
        super().handle_write()
        if self.ready_for_next():
            data, self.unread = self.unread, b""
            self.received(data)

    def ready_for_next(self):
        return bool(self.unread) and super().readable() and self.server.may_answer(self)

    def unsent(self):
        """Whether an answer, or part of one, waits for this client: in waitress's buffer, or
        in the kernel's (TIOCOUTQ: the bytes it has not sent)."""
        if self.total_outbufs_len:
            return True
        try:
            queued = fcntl.ioctl(self.socket, termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:  # closed already
            return False
        return struct.unpack("i", queued)[0] > 0

    def drop(self):
        """Close a connection the server gives up on; reset it if an answer is left unsent,
        so that the kernel forgets those bytes now instead of minutes later."""
        if self.unsent():
            with contextlib.suppress(OSError):  # closed already
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        self.handle_close()


class GuardedServer(waitress.server.TcpWSGIServer):
    """waitress's TCP server with OneRequestAtATime connections, SEND_BUFFER each, a cap per
    client address on connections and on answers held, idle connections closed even when
    their client reads nothing, and the longest-idle one closed for a new one when full."""

    channel_class = OneRequestAtATime

    def __init__(self, app, *, address_of, adj, **options):
        self.address_of = address_of
        self.per_address = max(1, min(MAX_CONNECTIONS_PER_ADDRESS, adj.connection_limit // 2))
        self.uncapped = adj.trusted_proxy  # None without a proxy
        self.held = None  # per address: [answers being written, bytes unsent]; see may_answer()
        super().__init__(app, adj=adj, **options)

    def admits(self, channel):
        """Whether `channel`, just accepted (and counted), is within its address's cap.

        A count over the open connections (1000 at most) costs less than the accept itself,
        and cannot drift from them as a counter kept beside them could.
        """
        if channel.addr[0] == self.uncapped:
            return True
        same = sum(other.client == channel.client for other in self.active_channels.values())
        return same <= self.per_address

    def make_room(self, channel):
        """Called for `channel`, just accepted: past connection_limit, closes the connection
        idle the longest with no request being answered, or else `channel` itself."""
        if len(self._map) <= self.adj.connection_limit:
            return
        idle = [
            other
            for other in self.active_channels.values()
            if other is not channel and not other.requests
        ]
        longest_idle = min(idle, key=lambda other: other.last_activity, default=channel)
        longest_idle.drop()

    def may_answer(self, channel):
        """Whether `channel`'s next request may be parsed and answered now: its address has
        fewer than ANSWERS_AT_ONCE being answered, and less than HELD_PER_ADDRESS unsent.

        The I/O thread counts every address's answers once per pass of its loop (see
        readable()), over the connections (1000 at most), and adds those it starts since.
        """
        if channel.addr[0] == self.uncapped:
            return True
        if self.held is None:
            self.held = {}
            for other in self.active_channels.values():
                held = self.held.setdefault(other.client, [0, 0])
                held[0] += bool(other.requests)
                held[1] += other.total_outbufs_len
        answers, unsent = self.held.get(channel.client, (0, 0))
        return answers < ANSWERS_AT_ONCE and unsent < HELD_PER_ADDRESS

    def answering(self, channel):
        """Counts a request of `channel` just handed to a worker (see may_answer())."""
        if self.held is not None:
            self.held.setdefault(channel.client, [0, 0])[0] += 1

    def readable(self):
        """waitress's, but it accepts also when connection_limit connections are open: the new
        one takes another's place (make_room()). Called once per pass of the I/O loop."""
        self.held = None  # answers and bytes held change between passes: counted again
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        return self.accepting

    def set_socket_options(self, conn):
        """waitress's (TCP_NODELAY), and SEND_BUFFER: before the channel reads it as the size
        of its sends."""
        super().set_socket_options(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)

    def maintenance(self, now):
        """Closes the connections idle for channel_timeout: no request being answered, and
        nothing received or sent since (waitress's own only marks them, see above); resets
        those with an answer left unsent (drop())."""
        cutoff = now - self.adj.channel_timeout
        idle = [
            channel
            for channel in self.active_channels.values()
            if not channel.requests and channel.last_activity < cutoff
        ]
        for channel in idle:
            channel.drop()
