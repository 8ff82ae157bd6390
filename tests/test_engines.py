"""The page in every engine: Chromium, Firefox, WebKit.

One set of tests of the page's promises, run in each engine (engines.py: Playwright for
Chromium, WebDriver BiDi for Firefox, Selenium and WebKitWebDriver for WebKit), each browser
started once per run. `-k firefox` runs one engine's alone. The Chromium-only tests (test_page.py
and others) use what only Playwright or Chromium can do: a fake clock, going offline, routes,
CDP's metrics.
"""

import os
import signal

import chat

# isort: split
import pytest

from tests import engines
from tests.helpers import AXE, free_port, post, seed, stored_texts, wait_until

pytestmark = pytest.mark.browser


ONLINE = "() => document.getElementById('status').textContent === 'online'"


TEXTS = "() => [...document.querySelectorAll('#chat-box .message .text')].map((t) => t.textContent)"


OWN_TEXTS = (
    "() => [...document.querySelectorAll('#chat-box .message.own .text')].map((t) => t.textContent)"
)


OUTBOX = "() => [...document.querySelectorAll('#outbox .message')].map((m) => m.textContent)"


# Anything that goes wrong in the page without a word: an exception, a refused script or style.
WATCH_PROBLEMS = """() => {
    window.problems = [];
    addEventListener("error", (event) => problems.push(`error: ${event.message}`));
    addEventListener("unhandledrejection", (event) => problems.push(`rejected: ${event.reason}`));
    document.addEventListener("securitypolicyviolation",
        (event) => problems.push(`policy: ${event.violatedDirective}`));
}"""


@pytest.fixture(scope="session", params=engines.ENGINES)
def engine(request):
    """Each engine once per run (pytest runs the tests of one engine together)."""
    if request.param == "chromium":
        yield engines.Chromium(request.getfixturevalue("browser"))
        return
    missing = engines.missing(request.param)
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests must run under CI: {missing}")
        pytest.skip(missing)
    started = engines.start(request.param)
    yield started
    started.close()


@pytest.fixture
def open_tab(engine):
    """Opens the chat in `engine` as a new person; fails the test on any error in the page."""
    tabs = []

    def open_as(port, name, viewport=None):
        """A returning visitor (`name` kept in localStorage), so the page joins at once."""
        tab = engine.new_tab(name=name, viewport=viewport)
        tabs.append(tab)
        tab.goto(f"http://127.0.0.1:{port}/")
        tab.evaluate(WATCH_PROBLEMS)
        tab.wait_for(ONLINE, what="the status 'online'")
        return tab

    yield open_as
    problems = []
    for tab in tabs:
        try:
            problems += tab.evaluate("() => window.problems || []")
        finally:
            tab.close()
    assert problems == []


def shows(tab, function, expected, *args, timeout=10):
    """Waits until `function(*args)` in the page gives `expected`; fails showing what it gave."""
    shown = []

    def gives_expected():
        shown[:] = [tab.evaluate(function, *args)]
        return shown[0] == expected

    try:
        wait_until(gives_expected, timeout)  # as wait_for_health() waits
    except AssertionError:
        raise AssertionError(f"the page shows {shown[0]!r}, not {expected!r}") from None


def type_into(tab, text, box="message-input"):
    """Focuses the box and types `text` into it, key by key (no key for a line break here)."""
    tab.evaluate("(id) => document.getElementById(id).focus()", box)
    tab.type(text)


def say_in(tab, text):
    """Puts `text` in the message box (as a paste would) and presses Enter."""
    tab.evaluate(
        "(text) => { const box = document.getElementById('message-input');"
        " box.focus(); box.value = text; box.dispatchEvent(new Event('input')); }",
        text,
    )
    tab.press("Enter")


def test_every_engine_the_page_comes_online_with_its_name(server, open_tab):
    tab = open_tab(server.port, "alice")
    shows(tab, "() => document.getElementById('name-input').value", "alice")
    shows(
        tab,
        "() => [...document.querySelectorAll('#online li')].map((li) => li.textContent)",
        ["alice (you)"],  # the online list marks oneself
    )


def test_every_engine_enter_sends_and_shift_enter_adds_a_line(server, open_tab):
    tab = open_tab(server.port, "alice")
    type_into(tab, "first line")
    tab.press("Shift+Enter")
    tab.type("second line")
    shows(tab, "() => document.getElementById('message-input').value", "first line\nsecond line")
    assert stored_texts(server.port) == []  # Shift+Enter sent nothing
    tab.press("Enter")
    shows(tab, TEXTS, ["first line\nsecond line"])
    shows(tab, "() => document.getElementById('message-input').value", "")
    assert stored_texts(server.port) == ["first line\nsecond line"]


def test_every_engine_own_message_is_stored_once_and_shown_once_as_own(server, open_tab):
    tab = open_tab(server.port, "alice")
    post(server.port, "/messages", {"name": "alice", "text": "the same name, not mine"})
    shows(tab, TEXTS, ["the same name, not mine"])
    say_in(tab, "mine")
    shows(tab, TEXTS, ["the same name, not mine", "mine"])
    shows(tab, OWN_TEXTS, ["mine"])
    shows(tab, OUTBOX, [])
    assert stored_texts(server.port) == ["the same name, not mine", "mine"]


def test_every_engine_shows_markup_as_text_runs_nothing_and_links_get_rel(server, open_tab):
    tab = open_tab(server.port, "mallory")
    attacks = ['<img src=x onerror="window.pwned=1">', "<script>window.pwned=1</script>"]
    for attack in attacks:
        say_in(tab, attack)
    shows(tab, TEXTS, attacks)  # stored before the HTTP post, which could overtake them
    other = "<svg onload=window.pwned=1> see https://example.org/a?b=1. not javascript:alert(1)"
    post(server.port, "/messages", {"name": "<i onmouseover=alert(1)>x</i>", "text": other})
    shows(tab, TEXTS, [*attacks, other])
    shows(tab, OWN_TEXTS, attacks)
    assert (
        tab.evaluate(
            "() => document.querySelector('#chat-box .message:last-child strong').textContent"
        )
        == "<i onmouseover=alert(1)>x</i>"
    )
    assert (
        tab.evaluate(
            "() => document.querySelectorAll('#chat-box img, #chat-box script, #chat-box svg,"
            " #chat-box i').length"
        )
        == 0
    )
    assert tab.evaluate("() => window.pwned === undefined")
    links = tab.evaluate(
        "() => [...document.querySelectorAll('#chat-box a')].map((a) =>"
        " [a.getAttribute('href'), a.rel, a.target])"
    )
    assert links == [["https://example.org/a?b=1", "noopener noreferrer nofollow ugc", "_blank"]]


def test_every_engine_sends_what_was_typed_while_the_server_was_away_once_it_is_back(
    chat_process, open_tab
):
    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    first = chat_process(*ports)
    first.urls()
    tab = open_tab(first.port, "alice")
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(5) == 0
    tab.wait_for(f"() => !({ONLINE})()", what="the status to leave 'online'")
    say_in(tab, "typed while away")
    tab.wait_for(
        "() => document.querySelector('#outbox .state')?.textContent.startsWith('Not sent yet')",
        what="the text marked 'Not sent yet'",
    )
    second = chat_process(*ports)
    second.urls()
    tab.wait_for(ONLINE, timeout=30, what="the page back online")  # its backoff: up to 10 s
    shows(tab, OUTBOX, [])
    shows(tab, OWN_TEXTS, ["typed while away"])
    assert stored_texts(second.port) == ["typed while away"]


@pytest.fixture
def quick_heartbeat(tmp_path, monkeypatch):
    """The page as served, with a heartbeat of 0.5 s instead of 10 s: a dead connection is
    noticed in a second or two, in every engine (Chromium's test, in test_page.py, moves a fake
    clock)."""
    html = chat.PAGE.read_text(encoding="utf-8")
    quick = html.replace("const HEARTBEAT = 10000;", "const HEARTBEAT = 500;")
    assert quick != html, "chat.html no longer says: const HEARTBEAT = 10000;"
    monkeypatch.setattr(chat, "PAGE", tmp_path / "chat.html")
    chat.PAGE.write_text(quick, encoding="utf-8")


def test_every_engine_notices_a_dead_connection_and_sends_what_was_pending_once(
    server, relay, quick_heartbeat, open_tab
):
    tab = open_tab(server.port, "alice")
    tab.evaluate("""() => {
        window.statuses = [];
        new MutationObserver(() => statuses.push(document.getElementById("status").textContent))
            .observe(document.getElementById("status"), {childList: true, subtree: true});
    }""")
    relay.go_silent()  # the connection stays open and carries nothing, either way
    say_in(tab, "through the gap")
    tab.wait_for("() => statuses.includes('reconnecting…')", what="the dead connection noticed")
    tab.wait_for(ONLINE, timeout=30, what="the page back online")
    shows(tab, OWN_TEXTS, ["through the gap"])
    shows(tab, OUTBOX, [])
    assert stored_texts(server.port) == ["through the gap"]


def test_every_engine_keeps_a_busy_room_bounded_and_loads_older_messages(server, open_tab):
    tab = open_tab(server.port, "reader")
    older = "() => !document.getElementById('load-older').hidden"
    assert not tab.evaluate(older)  # nothing older than nothing
    seed(700)
    tab.wait_for(f"() => ({TEXTS})().at(-1) === 'm700'", what="m700 shown")
    shown = len(tab.evaluate(TEXTS))
    assert shown <= 300
    assert tab.evaluate(older)
    tab.evaluate("() => document.getElementById('load-older').click()")
    tab.wait_for(f"(count) => ({TEXTS})().length === count", shown + 100)
    assert tab.evaluate(TEXTS)[0] == f"m{700 - shown - 99}"


PHONE_FITS = """() => {
    const fits = (element) => {
        const box = element.getBoundingClientRect();
        return box.left >= 0 && box.right <= innerWidth && box.bottom <= innerHeight;
    };
    const name = document.querySelector("#chat-box .message:last-child strong");
    return {
        phoneLayout: matchMedia("(max-width: 40rem)").matches,
        scrollsSideways: document.documentElement.scrollWidth > innerWidth,
        outside: [...document.querySelectorAll("header, #chat-form > *:not(label), aside")]
            .filter((element) => !fits(element)).map((element) => element.id || element.localName),
        nameFits: name.getBoundingClientRect().right <= innerWidth,
        onlineListOpen: document.getElementById("online-panel").open,
    };
}"""


def test_every_engine_the_phone_layout_fits(server, open_tab):
    """375 px wide (WebKit: the narrowest its MiniBrowser window allows, about 450 px)."""
    seed(30)
    tab = open_tab(server.port, "W" * 32, viewport=(375, 667))
    shows(tab, f"() => ({TEXTS})().length", 30)
    say_in(tab, "a long word: " + "x" * 200)
    shows(tab, f"() => ({OWN_TEXTS})().length", 1)
    assert tab.viewport()[0] <= 640  # under 40rem: what a phone shows
    assert tab.evaluate(PHONE_FITS) == {
        "phoneLayout": True,
        "scrollsSideways": False,
        "outside": [],
        "nameFits": True,
        "onlineListOpen": False,  # a count that opens on tap
    }


MESSAGE_BOX = """() => {
    const box = document.getElementById("message-input");
    return {height: box.offsetHeight, cut: box.scrollHeight > box.clientHeight};
}"""


def test_every_engine_message_box_grows_with_its_text_and_shrinks_once_sent(server, open_tab):
    """`field-sizing: content` where the engine has it, the page's own script where not."""
    tab = open_tab(server.port, "alice", viewport=(375, 667))
    empty = tab.evaluate(MESSAGE_BOX)
    assert not empty["cut"]  # the placeholder fits: two lines on a phone
    type_into(tab, "one")
    for line in ["two", "three"]:
        tab.press("Shift+Enter")
        tab.type(line)
    three_lines = tab.evaluate(MESSAGE_BOX)
    assert three_lines["height"] > empty["height"] and not three_lines["cut"]
    tab.press("Enter")
    shows(tab, OWN_TEXTS, ["one\ntwo\nthree"])
    shows(tab, MESSAGE_BOX, empty)


def axe_violations(tab):
    """axe-core's violations in the page as it is now (axe-core comes from npm: npm ci)."""
    if not AXE.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("the accessibility tests must run under CI: npm ci")
        pytest.skip("no axe-core: npm ci")
    tab.run_script(AXE.read_text())
    return tab.evaluate("""async () => (await axe.run()).violations.map(
        (v) => [v.id, v.impact, v.nodes.map((node) => node.target)])""")


@pytest.mark.parametrize("state", ["empty room", "busy room", "error", "phone"])
def test_every_engine_page_has_no_accessibility_violations(server, open_tab, state):
    """(The dark scheme is Chromium's test, in test_page.py: Playwright emulates it.)"""
    if state != "empty room":
        seed(50)
    tab = open_tab(server.port, "alice", viewport=(375, 667) if state == "phone" else None)
    if state != "empty room":
        shows(tab, f"() => ({TEXTS})().length", 50)
        say_in(tab, "mine, see https://example.org")
        shows(tab, f"() => ({OWN_TEXTS})()", ["mine, see https://example.org"])
    if state == "error":
        tab.evaluate("""() => {  // one message refused for good, and a text too long
            document.getElementById("message-input").value = "half an emoji \\ud83d";
            document.getElementById("chat-form").requestSubmit();
        }""")
        tab.wait_for("() => document.querySelector('#outbox .message.failed')")
        say_in(tab, "x" * 2001)
        tab.wait_for("() => document.getElementById('chat-error').textContent")
    assert axe_violations(tab) == []


def test_every_engine_screenshot_script_makes_a_desktop_and_a_phone_picture(engine, tmp_path):
    from tools.screenshot import make_engine_screenshots

    made = make_engine_screenshots(engine, tmp_path)
    assert [path.name for path in made] == [
        f"screenshot-{engine.name}-desktop.png",
        f"screenshot-{engine.name}-phone.png",
    ]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in made)


def test_every_engine_a_draft_kept_over_a_reload_shows_whole_in_the_message_box(server, open_tab):
    """Where the engine lacks `field-sizing` (the page grows the box itself), the restored
    draft sat in a one-line box: its other lines were hidden until the next key."""
    tab = open_tab(server.port, "alice", viewport=(375, 667))
    empty = tab.evaluate(MESSAGE_BOX)
    type_into(tab, "one")
    for line in ["two", "three"]:
        tab.press("Shift+Enter")
        tab.type(line)
    tab.goto(f"http://127.0.0.1:{server.port}/")
    tab.wait_for(ONLINE, what="the status 'online'")
    shows(tab, "() => document.getElementById('message-input').value", "one\ntwo\nthree")
    restored = tab.evaluate(MESSAGE_BOX)
    assert restored["height"] > empty["height"] and not restored["cut"]
