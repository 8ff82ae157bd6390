"""The tests' fixtures, for test_chat.py and every file in tests/ (the root conftest.py loads
this module as a plugin: a conftest.py in tests/ would reach only the files below it).

Programs from outside Python (a browser, redis-server, nginx) are skipped with a clear reason
when missing, except under CI=true, where they must run.
"""

import json
import os
import shutil

# isort: split
import pytest

from tests.chromium import CHROMIUM, CHROMIUM_FLAGS
from tests.helpers import (
    PUBLIC,
    ChatProcess,
    RedisServer,
    Relay,
    free_port,
    running_servers,
    seed_big,
    the_room,
)

# The fixtures that start a program from outside Python, by the marker of the tests that use them.
NEEDS = {
    "browser": {"browser", "open_page", "open_tab", "engine"},
    "redis": {"redis_server"},
    "nginx": {"behind_nginx"},
}


def pytest_collection_modifyitems(items):
    """A test that asks for a browser, redis-server or nginx carries its marker even where its
    file does not say so: `-m "not browser"` never starts a browser."""
    for item in items:
        for marker, fixtures in NEEDS.items():
            if fixtures & set(item.fixturenames):
                item.add_marker(marker)


@pytest.fixture
def server():
    with running_servers(history=1000) as servers:
        yield servers


@pytest.fixture
def small_server():
    with running_servers(history=3) as servers:
        yield servers


@pytest.fixture
def chat_process():
    started = []

    def start(*args, **popen):
        started.append(ChatProcess(*args, **popen))
        return started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free port, keeping its data across restarts (append-only file)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the Redis tests must run under CI: apt-get install redis-server")
        pytest.skip("no redis-server: apt-get install redis-server")
    server = RedisServer(binary, free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def two_processes(redis_server, chat_process):
    processes = [
        chat_process("--port", "0", "--ws-port", "0", "--redis", redis_server.url) for _ in range(2)
    ]
    for process in processes:
        process.urls()
    return processes


@pytest.fixture
def big_room():
    """A room keeping 2000 messages of 8 KB, 16 MB: more than the kernel's socket buffers
    (4 MB here) and the 1 MiB write limit together."""
    with running_servers(history=2000) as servers:
        seed_big(2000)
        yield servers


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "Playwright is not installed: python -m pip install -r requirements-test.txt"
    else:
        missing = (
            None
            if os.path.exists(CHROMIUM)
            else f"no Chromium at {CHROMIUM}: apt-get install chromium"
        )
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests must run under CI: {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser):
    """Opens the chat as a new person (own storage); fails the test on any dialog or CSP error."""
    from playwright.sync_api import expect

    contexts, problems = [], []

    def open_as(
        port=None, name=None, clock=False, prepare=None, online=True, url=None, **context_options
    ):
        """The page at http://127.0.0.1:`port`/, or at `url`. `name`: a returning visitor's kept
        name (the page joins at once); without it, a first-time visitor who takes the suggested
        name. `clock`: Playwright's clock, to move the page's timers on; `prepare(context)`:
        routes to set up before the page loads; `context_options`: a viewport, say."""
        context = browser.new_context(**context_options)
        contexts.append(context)
        if clock:
            context.clock.install()
        if prepare:
            prepare(context)
        if name:
            context.add_init_script(f"localStorage.setItem('chat-name', {json.dumps(name)})")
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.sent_frames = []  # every frame the page sends on its websockets, as sent
        page.on(
            "websocket", lambda ws: ws.on("framesent", lambda frame: page.sent_frames.append(frame))
        )
        page.on(
            "dialog",
            lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()),
        )
        page.on(
            "console",
            lambda msg: "Content Security Policy" in msg.text and problems.append(msg.text),
        )
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.touch = context_options.get("has_touch", False)
        page.goto(url or f"http://127.0.0.1:{port}/")
        if online:
            if not name:
                page.press("#name-input", "Enter")  # a first-time visitor takes the suggestion
            expect(page.locator("#status")).to_have_text("online")
        return page

    yield open_as
    for context in contexts:
        context.close()
    assert problems == []


@pytest.fixture
def proxied_server():
    """The chat as a proxy on this machine would reach it: --public-url https://chat.example.org."""
    with running_servers(public_url=PUBLIC) as servers:
        yield servers


@pytest.fixture
def relay(server):
    """The page connects through a Relay: /config and the page's policy name its port."""
    relay = Relay(server.ws_port)
    real_port, the_room().ws_port = the_room().ws_port, relay.port
    yield relay
    the_room().ws_port = real_port
    relay.close()
