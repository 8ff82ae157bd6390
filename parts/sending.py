"""Sending one frame to everyone, and the descriptors every connection needs.

Guarantees: send_prepared() delivers exactly what websockets.broadcast() would, to the same
connections, with the frame serialized once instead of once per client; a connection it cannot
write to directly goes to broadcast() itself. connection_limits() keeps HTTP, the websocket
clients, the handshakes beyond the cap and FD_RESERVED within the descriptor limit, which
raise_fd_limit() first raises as far as the system allows.
"""

from websockets.asyncio.server import broadcast
from websockets.frames import Frame, Opcode
from websockets.protocol import State

try:
    import resource  # Unix only: on Windows there is no descriptor limit to raise
except ImportError:
    resource = None

HTTP_CONNECTIONS = 1000  # open HTTP connections at most; fewer if the descriptor limit is lower
FD_RESERVED = 64  # descriptors for everything else: listening sockets, pipes, Redis, log files


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
    the tests of prepared frames.
    """
    protocol = connection.protocol
    return (
        protocol.state is State.OPEN
        and connection.send_in_progress is None
        and not protocol.expect_continuation_frame
        and not protocol.extensions
        and not connection.transport.is_closing()
    )


# Limits with headroom: file descriptors ....................................................


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


def connection_limits(fd_limit, max_clients):
    """How many connections fit in `fd_limit` descriptors, with headroom: HTTP connections,
    websocket clients, and websocket connections at all (clients and handshakes under way).

    An HTTP connection may need a second descriptor (waitress spools a response over 1 MB
    to a temporary file). What is left after HTTP and FD_RESERVED is for websockets, a
    tenth of it (at least 10) for handshakes beyond the cap, which get their 503.
    """
    http_connections = max(10, min(HTTP_CONNECTIONS, fd_limit // 8))
    websockets = max(2, fd_limit - FD_RESERVED - 2 * http_connections)
    max_clients = max(1, min(max_clients, websockets * 9 // 10))
    return http_connections, max_clients, min(websockets, max_clients + max(10, max_clients // 10))
