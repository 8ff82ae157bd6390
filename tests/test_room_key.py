"""A room key where strangers can reach the chat: Servers(key=...), as main() gives it for a
--host that is not loopback or --public-url. Without the key, nothing but /health; with it (in
the link, a Bearer header or the cookie the link sets), everything. Then the command line:
when there is a key, and the QR code of the link.
"""

import json
import os
import signal

import chat
from parts import access

# isort: split
import pytest
import websockets
from websockets.sync.client import connect

from tests.helpers import (
    ALL_ROUTES,
    BLACK_ON_WHITE,
    PUBLIC,
    RESET,
    ROOM_KEY,
    RUNNING,
    ask_room,
    free_port,
    qr_lines,
    raw_handshake,
    raw_request,
    receive,
    request,
    running_servers,
    say,
    seed,
    shows_qr_code_of,
    texts,
    the_room,
    ws_url,
)


@pytest.fixture
def keyed_server():
    with running_servers(key=ROOM_KEY) as servers:
        yield servers


def with_key(way, key=ROOM_KEY):
    """A request's path suffix and headers that bring `key` in one of the three ways."""
    return {
        "query": ("?key=" + key, {}),
        "bearer": ("", {"Authorization": f"Bearer {key}"}),
        "cookie": ("", {"Cookie": f"other=1; {RUNNING[-1].policy.cookie_name()}={key}"}),
    }[way]


WITHOUT_THE_KEY = [
    ("none", None),
    *[(way, "wrong-key-0123456789") for way in ("query", "bearer", "cookie")],
]


@pytest.mark.parametrize("way, key", WITHOUT_THE_KEY)
@pytest.mark.parametrize("method, path", ALL_ROUTES)
def test_without_the_key_every_route_but_health_is_refused_saying_how_to_get_in(
    keyed_server, method, path, way, key
):
    suffix, headers = with_key(way, key) if key else ("", {})
    answer = request(
        keyed_server.port, method, path + suffix, {"text": "stranger"}, headers=headers
    )
    status, content_type, body = answer
    if path == "/health":
        assert status == 200
        return
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    if path in ("/", "/chat", "/invite"):  # the pages a person opens
        assert status == 401 and content_type == "text/html; charset=utf-8"
        assert b"Open the link the chat printed" in body and b"stranger" not in body
    else:
        assert status == 401 and content_type.startswith("application/json")
        assert "open the link the chat printed" in json.loads(body)["errors"]["key"]
    assert [m["text"] for m in ask_room(the_room().fetch(0, 100))] == []


@pytest.mark.parametrize("way, key", WITHOUT_THE_KEY)
@pytest.mark.parametrize("path", ["/", "/chat", "/ws", "/echo"])
def test_without_the_key_the_handshake_is_refused_with_401(keyed_server, path, way, key):
    suffix, headers = with_key(way, key) if key else ("", {})
    url = ws_url(keyed_server, path) + suffix
    with (
        pytest.raises(websockets.exceptions.InvalidStatus) as refused,
        connect(url, open_timeout=5, additional_headers=headers),
    ):
        pass
    assert refused.value.response.status_code == 401
    assert b"open the link the chat printed" in refused.value.response.body


@pytest.mark.parametrize("way", ["query", "bearer", "cookie"])
def test_the_key_gets_in_as_query_bearer_or_cookie_on_http_and_the_handshake(keyed_server, way):
    suffix, headers = with_key(way)
    joiner = "&" if suffix else "?"
    status, _, _ = request(
        keyed_server.port, "POST", "/messages" + suffix, {"text": way}, headers=headers
    )
    assert status == 201
    url = ws_url(keyed_server) + suffix + f"{joiner}name={way}"
    with connect(url, open_timeout=5, additional_headers=headers) as ws:
        assert [m["text"] for m in receive(ws, "history")["messages"]] == [way]


def test_a_script_with_bearer_posts_and_reads(keyed_server):
    bearer = {"Authorization": f"Bearer {ROOM_KEY}"}
    posted = request(
        keyed_server.port, "POST", "/messages", {"text": "from a script"}, headers=bearer
    )
    read = request(keyed_server.port, "GET", "/messages", headers=bearer)
    assert posted.status == 201 and read.status == 200
    assert [m["text"] for m in json.loads(read.body)["messages"]] == ["from a script"]


def test_the_link_sets_an_httponly_lax_cookie_and_redirects_to_the_page_without_the_key(
    keyed_server,
):
    answer = request(keyed_server.port, "GET", f"/chat?name=sam&key={ROOM_KEY}")
    assert answer.status == 303 and answer.headers["Location"] == "/chat?name=sam"
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(f"{RUNNING[-1].policy.cookie_name()}={ROOM_KEY};")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http: a Secure cookie would never come back


def test_the_key_is_not_in_config(keyed_server):
    answer = request(keyed_server.port, "GET", "/config", headers=with_key("bearer")[1])
    assert answer.status == 200 and ROOM_KEY.encode() not in answer.body


@pytest.mark.browser
def test_browser_the_page_opened_with_the_key_comes_online_without_the_key_in_its_address(
    keyed_server, open_page
):
    from playwright.sync_api import expect

    page = open_page(url=f"http://127.0.0.1:{keyed_server.port}/?key={ROOM_KEY}", name="kim")
    assert page.url == f"http://127.0.0.1:{keyed_server.port}/"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: the page's script never sees it
    say(page, "with the key")
    expect(texts(page)).to_have_text(["with the key"])
    page.reload()
    expect(page.locator("#status")).to_have_text("online")
    expect(texts(page)).to_have_text(["with the key"])


@pytest.mark.browser
def test_browser_without_the_key_sees_no_message(keyed_server, open_page):
    from playwright.sync_api import expect

    seed(3, name="insider")
    page = open_page(url=f"http://127.0.0.1:{keyed_server.port}/", online=False)
    expect(page.locator("h1")).to_have_text("This chat needs its room key")
    assert "m1" not in page.content() and page.locator("#chat-box").count() == 0


@pytest.mark.browser
def test_browser_after_a_restart_with_another_key_says_to_open_the_new_link(
    chat_process, open_page
):
    from playwright.sync_api import expect

    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    first = chat_process(*ports, "--key", ROOM_KEY)
    first.urls()
    page = open_page(url=f"http://127.0.0.1:{first.port}/?key={ROOM_KEY}", name="alice")
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(5) == 0
    second = chat_process(*ports, "--key", ROOM_KEY[::-1])  # the old cookie no longer opens it
    second.urls()
    expect(page.locator("#status")).to_have_text("locked out: open the link the chat printed")


def test_a_chat_on_every_address_prints_a_qr_code_of_its_first_link(chat_process):
    process = chat_process("--host", "0.0.0.0", "--port", "0", "--ws-port", "0")
    page, _ = process.urls()
    link = page.split()[-1]
    lines = []
    while len(lines) < qr_lines(link):
        line = process.lines.get(timeout=5).rstrip("\n")
        if line.startswith(BLACK_ON_WHITE) and line.endswith(RESET):  # after the URLs
            lines.append(line.removeprefix(BLACK_ON_WHITE).removesuffix(RESET))
    assert process.key and link.endswith(f"/?key={process.key}")
    assert shows_qr_code_of(lines, link)
    assert not shows_qr_code_of(lines, link.replace(process.key, process.key[::-1]))


@pytest.mark.parametrize(
    "args",
    [
        ["--host", "0.0.0.0", "--key", ROOM_KEY],
        ["--public-url", PUBLIC, "--key", ROOM_KEY],
        ["--key", ROOM_KEY],
    ],
)
def test_key_keeps_the_link_over_a_restart(chat_process, args):
    for _ in range(2):
        process = chat_process("--port", "0", "--ws-port", "0", *args)
        page, websocket = process.urls()
        assert page.endswith(f"/?key={ROOM_KEY}\n") and websocket.endswith(f"/?key={ROOM_KEY}\n")
        assert request(process.port, "GET", "/messages")[0] == 401
        process.stop()


def test_no_key_says_that_anyone_who_can_reach_the_port_is_in(chat_process):
    process = chat_process("--host", "0.0.0.0", "--port", "0", "--ws-port", "0", "--no-key")
    page, _ = process.urls()
    assert "?key=" not in page
    line = process.lines.get(timeout=5)
    while line.startswith(("Chat page:", "Websocket:", "Invitation:")):
        line = process.lines.get(timeout=5)
    assert line == f"No room key (--no-key): anyone who can reach port {process.port} is in.\n"
    assert request(process.port, "GET", "/messages")[0] == 200


@pytest.mark.parametrize(
    "args, error",
    [
        (["--key", "short"], "argument --key: a room key is 16 or more"),
        (["--key", "a key with spaces in it"], "argument --key: a room key is 16 or more"),
        (["--key", ROOM_KEY, "--no-key"], "--key and --no-key: choose one"),
        (
            ["--public-url", PUBLIC, "--redis", "redis://127.0.0.1:1/0"],
            "--redis where strangers can reach the chat: give every process the same --key=KEY",
        ),
    ],
)
def test_a_bad_key_flag_is_one_line_and_exit_2(chat_process, args, error):
    process = chat_process(*args)
    assert process.process.wait(15) == 2
    printed = process.process.stderr.read()
    assert printed.count("\n") == 1 and printed.startswith(f"chat.py: error: {error}")


def test_a_room_key_from_the_environment_is_the_key_and_stays_off_the_command_line(chat_process):
    process = chat_process(
        *("--port", "0", "--ws-port", "0"), env={**os.environ, "CHAT_KEY": ROOM_KEY}
    )
    process.urls()
    assert process.key == ROOM_KEY  # in the printed link
    assert ROOM_KEY not in " ".join(process.process.args)  # what `ps` shows
    assert request(process.port, "GET", "/messages")[0] == 401
    assert request(process.port, "GET", f"/messages?key={ROOM_KEY}")[0] == 200


def test_a_key_the_chat_makes_can_be_given_back_with_key_to_keep_the_link(monkeypatch):
    """A random key may begin with "-", and then `--key KEY` reads it as another option."""
    keys = iter(["-begins-with-a-dash-0", "a-room-key-with-no-dash"])
    monkeypatch.setattr(access.secrets, "token_urlsafe", lambda _: next(keys))
    made = chat.parse_args(["--host", "0.0.0.0"]).key
    assert chat.parse_args(["--host", "0.0.0.0", "--key", made]).key == made


@pytest.mark.browser
def test_browser_locked_out_the_banner_says_to_open_the_new_link_and_then_what_waits_goes(
    chat_process, open_page
):
    """The banner said "trying again, what you send goes when the chat is back": it never
    tries again. Opening the new link in the same tab brings the waiting message and the draft."""
    from playwright.sync_api import expect

    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    first = chat_process(*ports, "--key", ROOM_KEY)
    first.urls()
    page = open_page(url=f"http://127.0.0.1:{first.port}/?key={ROOM_KEY}", name="alice")
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(5) == 0
    say(page, "typed while it was away")
    page.fill("#message-input", "half a thought")
    second = chat_process(*ports, "--key", ROOM_KEY[::-1])
    second.urls()
    expect(page.locator("#status")).to_have_text("locked out: open the link the chat printed")
    banner = page.locator("#offline")
    expect(banner).to_contain_text("Locked out")
    expect(banner).not_to_contain_text("trying again")
    page.goto(f"http://127.0.0.1:{second.port}/?key={ROOM_KEY[::-1]}")
    expect(page.locator("#status")).to_have_text("online")
    expect(texts(page)).to_have_text(["typed while it was away"])
    expect(page.locator("#message-input")).to_have_value("half a thought")
    expect(banner).to_be_hidden()


@pytest.mark.parametrize("other", ["theme=dark mode", 'prefs={"a":1}', "flag", 'q="open'])
def test_another_cookie_of_the_host_does_not_hide_the_room_key(keyed_server, other):
    # Cookies are per host, not per port: other pages on localhost or the LAN address set
    # theirs, and http.cookies stopped reading at the first one it could not parse.
    cookie = {"Cookie": f"{other}; {RUNNING[-1].policy.cookie_name()}={ROOM_KEY}"}
    assert request(keyed_server.port, "GET", "/config", headers=cookie).status == 200
    with connect(ws_url(keyed_server), open_timeout=5, additional_headers=cookie) as ws:
        assert receive(ws, "history")["type"] == "history"


def test_a_bearer_key_in_an_authorization_sent_twice_gets_in_over_http_as_on_the_handshake(
    keyed_server,
):
    # waitress joins a header sent twice with ", "; the handshake keeps both
    headers = [
        ("Host", "127.0.0.1"),
        ("Authorization", "Bearer not-the-key-0123456789"),
        ("Authorization", f"Bearer {ROOM_KEY}"),
    ]
    assert raw_handshake(keyed_server.ws_port, headers)[0] == 101
    assert raw_request(keyed_server.port, "GET", "/config", headers)[0] == 200
