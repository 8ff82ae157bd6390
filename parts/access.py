"""Who may talk to the chat: the Host a request names, the Origin of a write, the room key.

Guarantees: one Policy answers for every HTTP request and every websocket handshake alike;
a Host that a stranger could point at this machine is refused, and so is a write or a
handshake from another site's page; where a room key is set, nothing but /health is served
without it, and comparing keys tells nothing about how much of a guess was right. Host
headers and origins are read in one place (host_and_port()), and a bad one is a ValueError,
never a crash. The command line's --key, --allow-host and --public-url are read here too,
and the page's Content-Security-Policy lets only its own script and style run, and connect
only to the chat.
"""

import argparse
import base64
import contextlib
import hashlib
import hmac
import http
import http.cookies
import ipaddress
import json
import os
import re
import secrets
import socket
import urllib.parse

PROXY = (
    "127.0.0.1"  # with --public-url, the proxy on this machine whose X-Forwarded-For is believed
)
POLICY = "chat.policy"  # the key of the servers' Policy in each HTTP request's WSGI environ


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


def presented_keys(query, authorizations, cookies, cookie_name):
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
        if name.strip() == cookie_name:
            keys.append(value.strip().strip('"'))
    return keys


def check_http_request(request, response):
    """The policy above, before any route: a foreign Host is refused, and so is a foreign write."""
    policy = request.env[POLICY]
    is_write = request.method not in ("GET", "HEAD")
    origin = request.get_header("Origin") if is_write else None
    refusal = policy.refusal(request.get_header("Host"), origin)
    if refusal:
        status, header, reason = refusal
        refuse(response, f"{status.value} {status.phrase}", {header: reason})  # "403 Forbidden"


def check_room_key(request, response):
    """Where strangers can reach the chat, only those with the room key get anything but /health
    (for monitors): a JSON 401 that says how to get in, or for a page a person opens (the chat,
    the invitation) a page that says it."""
    policy = request.env[POLICY]
    if policy.key is None or request.path == "/health":
        return
    authorization = request.get_header("Authorization")
    keys = presented_keys(
        request.query_string,
        [authorization] if authorization else [],
        [request.get_header("Cookie") or ""],
        policy.cookie_name(),
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
    the key stays out of the address bar, the history and a photo of the projector.

    Its Set-Cookie carries the key, so no cache may store the answer (no-store): the key would
    stay on a proxy's or the browser's disk, long after the session the cookie lasts.
    """
    policy = request.env[POLICY]
    if policy.admits([value for name, value in query if name == "key"]):  # not the old cookie's
        response.append_header("Set-Cookie", policy.key_cookie())
    response.set_header("Cache-Control", "no-store")
    rest = urllib.parse.urlencode([(name, value) for name, value in query if name != "key"])
    response.status = "303 See Other"
    response.set_header("Location", request.path + (f"?{rest}" if rest else ""))
    return ""


def refuse(response, status, errors):
    """Answer now, with hug's JSON error format: falcon runs no route after this."""
    response.status = status
    response.content_type = "application/json; charset=utf-8"
    response.body = json.dumps({"errors": errors})
    response.complete = True


# Host names and origins ..................................................................


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


def handshake_keys(request, cookie_name):
    """The room keys a handshake brings (see presented_keys())."""
    url, headers = urllib.parse.urlsplit(request.path), request.headers
    return presented_keys(
        url.query, headers.get_all("Authorization"), headers.get_all("Cookie"), cookie_name
    )


def client_address(connection, policy):
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


# The command line: the room key, host names, the public URL ..............................


def choose_room_key(parser, args):
    """A key wherever strangers can reach the chat: a --host that is not loopback, --public-url.

    Several processes of one room (--redis) must accept one key: each would make its own, so
    they are given the same --key (the docs say so).
    """
    exposed = args.public_url or not is_loopback(args.host)
    if args.key and args.no_key:
        parser.error("--key and --no-key: choose one")
    if not args.key and os.environ.get("CHAT_KEY"):  # where a key stays out of every user's `ps`
        if args.no_key:
            parser.error("CHAT_KEY and --no-key: choose one")
        try:
            args.key = room_key_argument(os.environ["CHAT_KEY"])
        except argparse.ArgumentTypeError as error:
            parser.error(f"CHAT_KEY: {error}")
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


def public_url_argument(value):
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


# The page's Content-Security-Policy ..........................................................


def page_policy(html, websocket):
    """Only the page's own inline script and style (by hash) may run, and only our websocket."""
    return (
        f"default-src 'none'; script-src {inline_hashes(html, 'script')}; "
        f"style-src {inline_hashes(html, 'style')}; img-src data:; "
        f"connect-src 'self' {websocket}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def inline_hashes(html, tag):
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    digests = (
        base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() for block in blocks
    )
    return " ".join(f"'sha256-{digest}'" for digest in digests)
