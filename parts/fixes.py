"""Workarounds for hug 2.6.1, falcon 2.0.0 and waitress 3, each where the library falls short.

Guarantees: `import hug` works where NumPy 2 is installed (import this module before hug);
once fix_hug(api) ran, every query string and request body is read as UTF-8 or refused with a
400, never a 500 nor a U+FFFD, an unreadable Content-Type is a 415, and HEAD is answered as GET
without its body on every route; request_host() never raises for a Host falcon cannot read;
stop_waitress() and close_websockets() stop servers that their libraries only know how to
run until the process ends, within a few seconds; asyncio_event_loop() is asyncio's own loop
even when hug set uvloop's policy.
"""

import asyncio
import contextlib
import functools
import json
import re
import sys
import urllib.parse

# hug 2.6.1 uses NumPy when it can import it, and then a name that NumPy 2 removed
# (np.unicode_), so `import hug` fails. The chat needs no NumPy: it is hidden while hug loads,
# and then given back to any other code.
sys.modules.setdefault("numpy", None)
import hug

if sys.modules["numpy"] is None:
    del sys.modules["numpy"]
from cgi import parse_multipart  # after hug, which imported it already: no second warning

import waitress.wasyncore
from falcon.util.uri import parse_query_string
from hug.format import parse_content_type

from parts.access import host_and_port, refuse
from parts.errors import BadInput


def fix_hug(api):
    """Give `api` the body readers and the middleware below, after the chat's own middleware
    (falcon runs middleware in the order it was added)."""
    for media_type, reader in READERS.items():
        hug.default_input_format(media_type, api=api)(reader)
    hug.request_middleware(api=api)(refuse_query_strings_that_are_not_utf8)
    hug.request_middleware(api=api)(refuse_unreadable_bodies)
    hug.request_middleware(api=api)(give_readers_only_the_media_type)
    hug.middleware_class(api=api)(AnswerHeadAsGet)


def without_nulls(data):
    """A JSON object without its null fields: null is the same as leaving a field out, for
    every field, over HTTP (read_json()) and websocket (chat.py's read_frame()) alike."""
    if not isinstance(data, dict):
        return data
    return {key: value for key, value in data.items() if value is not None}


def request_host(request):
    """The name as the browser wrote it ("localhost." too: the CSP must name what it connects
    to), not falcon's request.host, which raises for "Host: localhost:" (a 500)."""
    host = request.get_header("Host")
    return host_and_port(host)[0] if host else request.env["SERVER_NAME"]


# hug's request-body readers ..................................................................


def read_utf8(body):
    """Bodies are UTF-8. hug's readers trust the header's charset, even a bogus one (a 500)."""
    try:
        return body.read().decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("the body is not valid UTF-8") from None


def read_json(body, **_header_params):
    try:
        return without_nulls(json.loads(read_utf8(body)))
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise BadInput(f"the body is not valid JSON: {error}") from None


def read_form(body, **_header_params):
    """hug's own form reader also splits "text=a,b" into a list."""
    return parse_query_string(read_utf8(body), keep_blank=True, csv=False)


def read_text(body, **_header_params):
    return read_utf8(body)


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


def refuse_query_strings_that_are_not_utf8(request, response):
    """falcon decodes a query string's bytes with errors="replace": "?text=%ff" was stored
    as U+FFFD, where the same bytes in a body are a 400. The WSGI server hands the bytes
    over as Latin-1 (PEP 3333), so encoding them back gives them as the client sent them."""
    try:
        urllib.parse.unquote_to_bytes(request.query_string.encode("latin-1")).decode("utf-8")
    except UnicodeError:
        refuse(response, hug.HTTP_400, {"query": "the query string is not valid UTF-8"})


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


READERS = {
    "application/json": read_json,
    "application/x-www-form-urlencoded": read_form,
    "text/plain": read_text,
    "multipart/form-data": read_multipart,
}


# The event loop: asyncio's own, whatever policy hug set ......................................


def asyncio_event_loop():
    """A new event loop of asyncio's own, whatever loop policy the process was given.

    `import hug` sets uvloop's policy whenever uvloop can be imported, so
    asyncio.new_event_loop() would then give a loop that behaves otherwise (a write to a
    closing transport raises instead of being dropped) and that no test runs. The chat
    offers no other loop: measured, uvloop did not make its fan-out to 1,000 faster.
    asyncio's own default loop is the proactor on Windows and the selector loop elsewhere
    (asyncio.EventLoop, from Python 3.13).
    """
    if sys.platform == "win32":
        return asyncio.ProactorEventLoop()
    return asyncio.SelectorEventLoop()


# Stopping waitress and websockets from another thread ........................................


def stop_waitress(server, socket_map, thread):
    """Stop a waitress server that runs in `thread` (None: bound, but never served).

    waitress documents only serve(), which runs until the process ends. Its worker threads
    stop first: each finishes the answer it is writing (a worker never waits for a client,
    see parts/http_server.py), and the requests still queued are dropped. Only then are the
    sockets closed: closed under a worker writing its answer, waitress logged two tracebacks
    (a write to a closed descriptor, then a flush of a buffer already gone). To close them
    from another thread, its own trigger (a pipe its I/O loop watches) runs close_all() in
    that loop; a request's wake-up can come first and close the trigger, which is just as
    good.
    """
    server.task_dispatcher.shutdown(timeout=4)
    close_all = functools.partial(waitress.wasyncore.close_all, socket_map)
    if thread is None:
        close_all()
    else:
        with contextlib.suppress(OSError):  # the trigger was closed by the time we pulled it
            server.trigger.pull_trigger(close_all)
        thread.join(5)


async def close_websockets(server, handshakes, close_timeout):
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
        async with asyncio.timeout(close_timeout):  # what each closing handshake may take
            await server.wait_closed()
    except TimeoutError:
        # A client catching up that stopped reading: its close frame waits behind a history
        # piece it never takes (see ChatConnection.catching_up()), and close() with it. Such
        # a client held a shutdown for the ping timeout, 20 s, and stop() gave up at 6.
        for connection in list(server.all_connections):
            connection.transport.abort()
        await server.wait_closed()
