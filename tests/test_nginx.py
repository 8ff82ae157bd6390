"""Behind the real nginx: deploy/nginx.conf in front of two `chat.py --redis`, over https and wss,
with pages in Chromium; then kill -9 of a chat process and of redis-server while pages type.
"""

import collections
import functools
import http.client
import json
import signal
import subprocess

import pytest
import websockets
from websockets.sync.client import connect

from tests.helpers import (
    REBIND,
    ROOM_KEY,
    Nginx,
    get,
    needed_program,
    receive,
    refused_handshake,
    say,
    texts,
    unverified_tls,
    wait_for_health,
)

pytestmark = [pytest.mark.nginx, pytest.mark.redis]


@pytest.fixture
def behind_nginx(tmp_path, redis_server, chat_process):
    """deploy/nginx.conf on a free port with a self-signed certificate, in front of two chat.py --redis."""
    nginx_binary = needed_program("nginx", "nginx")
    openssl = needed_program("openssl", "openssl")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(tmp_path / "key.pem"),
            "-out",
            str(tmp_path / "cert.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    nginx = Nginx(nginx_binary, tmp_path)
    nginx.key = ROOM_KEY  # every process of one room is given the same --key
    nginx.chat_processes = [
        chat_process(
            *("--port", "0", "--ws-port", "0", "--redis", redis_server.url),
            *("--public-url", nginx.url, "--key", nginx.key),
        )
        for _ in range(2)
    ]
    for process in nginx.chat_processes:
        process.urls()
    nginx.configure(nginx.chat_processes)
    nginx.start()
    yield nginx
    nginx.stop()


@pytest.mark.browser
def test_browser_two_pages_behind_nginx_chat_in_one_order_over_wss_and_a_reload_misses_nothing(
    behind_nginx, open_page
):
    from playwright.sync_api import expect

    sockets = []
    link = f"{behind_nginx.url}/?key={behind_nginx.key}"
    alice, bob = (open_page(url=link, ignore_https_errors=True) for _ in range(2))
    assert alice.url == bob.url == f"{behind_nginx.url}/"  # the key went into a cookie:
    assert [(c["secure"], c["httpOnly"], c["sameSite"]) for c in alice.context.cookies()] == [
        (True, True, "Lax")  # Secure behind https
    ]
    for page in (alice, bob):
        page.on("websocket", lambda ws: sockets.append(ws.url))
    say(alice, "one")
    expect(texts(bob)).to_have_text(["one"])
    say(bob, "two")
    expect(texts(alice)).to_have_text(["one", "two"])  # else "three" may be stored first
    say(alice, "three")
    for page in (alice, bob):
        expect(texts(page)).to_have_text(["one", "two", "three"])

    bob.evaluate("location.reload()")  # mid-conversation: alice goes on while bob's page loads
    say(alice, "four")
    say(alice, "five")
    expect(bob.locator("#status")).to_have_text("online")
    say(bob, "six")
    for page in (alice, bob):
        expect(texts(page)).to_have_text(["one", "two", "three", "four", "five", "six"])
    assert sockets and all(
        url.startswith(f"wss://localhost:{behind_nginx.https_port}/ws?") for url in sockets
    )


def test_behind_nginx_a_foreign_host_and_a_foreign_origin_are_still_refused(behind_nginx):
    connection = http.client.HTTPSConnection(
        "127.0.0.1", behind_nginx.https_port, timeout=10, context=unverified_tls()
    )
    connection.request("GET", "/messages", headers={"Host": REBIND})
    response = connection.getresponse()
    assert (
        response.status == 403
        and f"--allow-host {REBIND}" in json.loads(response.read())["errors"]["host"]
    )
    connection.close()
    url = f"wss://localhost:{behind_nginx.https_port}/ws"
    assert refused_handshake(url, ssl=unverified_tls(), origin="https://evil.example") == 403


def test_behind_nginx_sigterm_closes_wss_clients_with_1001(behind_nginx, chat_process):
    url = f"wss://localhost:{behind_nginx.https_port}/ws?key={behind_nginx.key}"
    with connect(
        url, ssl=unverified_tls(), open_timeout=5, origin=behind_nginx.url, max_queue=None
    ) as ws:
        receive(ws, "history")
        for process in behind_nginx.chat_processes:
            process.process.send_signal(signal.SIGTERM)
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1001


KEEP_TYPING = """(who) => {
    window.typed = [];
    window.typing = setInterval(() => {
        typed.push(`${who} ${typed.length}`);
        document.getElementById("message-input").value = typed.at(-1);
        document.getElementById("chat-form").requestSubmit();
    }, 300);
}"""


OWN_STORED = "() => document.querySelectorAll('#chat-box .message.own').length"


SHOWN_MESSAGES = """() => [...document.querySelectorAll("#chat-box .message")]
    .map((item) => [Number(item.dataset.id), item.querySelector(".text").textContent])"""


def typed_on(pages, more=3, timeout=30_000):
    """Waits until each page has `more` of its own messages stored (shown as messages) than now."""
    for page in pages:
        count = page.evaluate(OWN_STORED)
        page.wait_for_function(f"(n) => ({OWN_STORED})() >= n", arg=count + more, timeout=timeout)


def clients_on(process):
    return get(process.port, "/health")[1]["clients"]


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_behind_nginx_kill_9_of_a_chat_process_and_of_redis_with_two_pages_typing_loses_nothing(
    behind_nginx, redis_server, chat_process, open_page
):
    from playwright.sync_api import expect

    link = f"{behind_nginx.url}/?key={behind_nginx.key}"  # the link the chat prints
    pages = [open_page(url=link, ignore_https_errors=True) for _ in range(2)]
    for page, who in zip(pages, ("alice", "bob"), strict=True):
        page.evaluate(KEEP_TYPING, who)
    typed_on(pages)

    # (a) kill -9 of the process that holds the pages' connections: they come back to the other
    a, b = behind_nginx.chat_processes
    victim, survivor = (a, b) if clients_on(a) >= clients_on(b) else (b, a)
    assert clients_on(victim) >= 1
    victim.process.kill()
    victim.process.wait(5)
    wait_for_health(survivor.port, timeout=30, clients=2)
    typed_on(pages)

    # (b) kill -9 of redis-server: what is typed meanwhile waits; then it restarts with its data
    redis_server.process.kill()
    redis_server.process.wait(5)
    # online, the chat asks the page to wait ("later"); offline a moment, it waits ("waiting")
    pages[0].wait_for_function(
        "() => document.querySelector('#outbox .message.later, #outbox .message.waiting')"
    )
    redis_server.start()
    typed_on(pages)

    # (c) the killed process started again on its ports: it rejoins the room
    again = chat_process(
        *("--port", str(victim.port), "--ws-port", str(victim.ws_port)),
        *("--redis", redis_server.url, "--public-url", behind_nginx.url, "--key", behind_nginx.key),
    )
    again.urls()
    typed_on(pages)

    typed = []
    for page in pages:
        typed.append(page.evaluate("() => (clearInterval(typing), typed)"))
        expect(page.locator("#outbox .message")).to_have_count(0, timeout=30_000)
    every_message = f"/messages?limit=1000&key={behind_nginx.key}"
    stored = get(survivor.port, every_message)[1]["messages"]
    texts_stored = [message["text"] for message in stored]
    assert collections.Counter(texts_stored) == collections.Counter(typed[0] + typed[1])
    for own in typed:  # each person's messages in the order typed
        assert [text for text in texts_stored if text in set(own)] == own
    wait_for_health(again.port, last_id=stored[-1]["id"])
    assert get(again.port, every_message)[1]["messages"] == stored
    order = [[message["id"], message["text"]] for message in stored]
    for page in pages:  # one order on both pages, each showing the newest messages
        page.wait_for_function(
            f"(id) => ({SHOWN_MESSAGES})().at(-1)?.[0] === id", arg=stored[-1]["id"]
        )
        shown = page.evaluate(SHOWN_MESSAGES)
        assert shown == order[-len(shown) :]


@pytest.mark.slow
def test_behind_nginx_once_each_process_was_killed_in_turn_new_websockets_still_get_through(
    behind_nginx, redis_server, chat_process
):
    """nginx must not keep a process it once found dead marked down (max_fails=0)."""
    url = f"wss://localhost:{behind_nginx.https_port}/ws?key={behind_nginx.key}"
    through_nginx = functools.partial(
        connect, url, ssl=unverified_tls(), open_timeout=5, origin=behind_nginx.url
    )
    a, b = behind_nginx.chat_processes
    a.process.kill()
    a.process.wait(5)
    with through_nginx() as ws:  # to b, once nginx found a refusing
        receive(ws, "history")
    chat_process(
        *("--port", str(a.port), "--ws-port", str(a.ws_port)),
        *("--redis", redis_server.url, "--public-url", behind_nginx.url, "--key", behind_nginx.key),
    ).urls()
    b.process.kill()
    b.process.wait(5)
    with through_nginx() as first, through_nginx() as second:  # both to a, back again
        receive(first, "history")
        receive(second, "history")
