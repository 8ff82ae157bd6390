"""The page in a real browser (Playwright driving Debian's Chromium): it keeps every promise to
the person typing, connected or not, on a desktop and on a phone, and stays accessible.

Playwright's sync API keeps an event loop running in the main thread for the whole session:
asyncio code in tests goes through run_async(), so these tests may run in any order.
"""

import contextlib
import json
import os
import signal

# isort: split
import pytest

from tests.helpers import (
    AXE,
    CODE_MESSAGE,
    PHONE,
    RTL_NAME,
    RTL_TEXT,
    ask_room,
    free_port,
    joined,
    post,
    presence_frames,
    receive,
    record_statuses,
    say,
    seed,
    stored_texts,
    texts,
    the_room,
    wait_for_health,
    wait_in_page,
)

pytestmark = pytest.mark.browser


def test_browser_trims_white_space_exactly_as_the_server_does(server, open_page):
    page = open_page(server.port)
    page_trims = page.evaluate(
        """() => {
            const trims = [];
            for (let c = 0; c <= 0x10ffff; c++) {
                if (trimmed(String.fromCodePoint(c)) === "") trims.push(c);
            }
            return trims;
        }"""
    )
    server_trims = [c for c in range(0x110000) if not chr(c).strip()]
    assert page_trims == server_trims


def test_browser_does_not_send_a_text_of_information_separators(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)
    say(page, "\x1c\x1d")  # white space to Python's str.strip(), not to JavaScript's trim()
    say(page, "real")
    expect(texts(page)).to_have_text(["real"])
    assert sent_texts(page) == ["real"]
    expect(page.locator("#chat-error")).not_to_contain_text("text is empty")


def test_browser_message_typed_in_one_page_shows_in_both_in_order_with_names(server, open_page):
    from playwright.sync_api import expect

    alice, bob = open_page(server.port, "alice"), open_page(server.port, "bob")
    for text in ["one", "two", "three"]:
        say(alice, text)
    expect(texts(bob)).to_have_text(["one", "two", "three"])
    say(bob, "four")
    for page in (alice, bob):
        expect(texts(page)).to_have_text(["one", "two", "three", "four"])
        expect(page.locator("#chat-box .message strong")).to_have_text(["alice"] * 3 + ["bob"])
    expect(alice.locator("#chat-box .message.own .text")).to_have_text(["one", "two", "three"])
    expect(bob.locator("#chat-box .message.own .text")).to_have_text(["four"])


def test_browser_shows_history_on_load_and_who_is_online(server, open_page):
    from playwright.sync_api import expect

    for text in ["earlier 1", "earlier 2"]:
        post(server.port, "/messages", {"name": "carol", "text": text})
    alice = open_page(server.port, "alice")
    expect(texts(alice)).to_have_text(["earlier 1", "earlier 2"])
    open_page(server.port, "bob")
    expect(alice.locator("#online li")).to_have_text(["alice (you)", "bob"])
    expect(alice.locator("#chat-box .notice").last).to_have_text("bob joined")


def sent_texts(page):
    """The texts of the message frames the page has sent."""
    frames = [json.loads(frame) for frame in page.sent_frames]
    return [
        frame.get("text")
        for frame in frames
        if isinstance(frame, dict) and frame.get("type") == "message"
    ]


def test_browser_does_not_send_an_empty_message(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)
    say(page, "   ")
    say(page, "real")
    expect(texts(page)).to_have_text(["real"])
    wait_in_page(page, lambda: "real" in sent_texts(page))
    assert sent_texts(page) == ["real"]
    # no refusal from the server
    expect(page.locator("#chat-error")).not_to_contain_text("text is empty")


def test_browser_shows_server_errors_next_to_the_input(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)
    page.fill("#name-input", "bell\u0007")  # a name the server refuses
    page.dispatch_event("#name-input", "change")
    expect(page.locator("#chat-error")).to_contain_text("control characters")


def test_browser_reconnects_after_a_drop_and_shows_what_it_missed_once(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    page.evaluate("""() => {
        window.statuses = [];
        new MutationObserver(() => statuses.push(document.getElementById("status").textContent))
            .observe(document.getElementById("status"), {childList: true, characterData: true, subtree: true});
    }""")
    for text in ["before 1", "before 2"]:
        post(server.port, "/messages", {"name": "bob", "text": text})
    expect(texts(page)).to_have_text(["before 1", "before 2"])

    async def drop_everyone_then_post():
        for connection in list(the_room().clients):
            connection.transport.abort()
        for text in ["missed 1", "missed 2"]:
            await the_room().post("bob", text)

    ask_room(drop_everyone_then_post())
    expect(texts(page)).to_have_text(["before 1", "before 2", "missed 1", "missed 2"])
    post(server.port, "/messages", {"name": "bob", "text": "after"})
    expect(texts(page)).to_have_text(["before 1", "before 2", "missed 1", "missed 2", "after"])
    assert "reconnecting…" in page.evaluate("statuses")
    expect(page.locator("#status")).to_have_text("online")


def test_browser_recovers_when_the_server_restarts_on_the_same_ports(chat_process, open_page):
    from playwright.sync_api import expect

    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    first = chat_process(*ports)
    first.urls()
    page = open_page(first.port, "alice")
    for text in ["old 1", "old 2", "old 3"]:
        post(first.port, "/messages", {"text": text})
    expect(texts(page)).to_have_text(["old 1", "old 2", "old 3"])
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(5) == 0

    second = chat_process(*ports)
    second.urls()
    # id 1 again: only the room id tells them apart
    post(second.port, "/messages", {"text": "new 1"})
    expect(texts(page)).to_have_text(["old 1", "old 2", "old 3", "new 1"])
    expect(page.locator("#chat-box .notice", has_text="restarted")).to_have_count(1)
    post(second.port, "/messages", {"text": "new 2"})
    expect(texts(page)).to_have_text(["old 1", "old 2", "old 3", "new 1", "new 2"])


def test_browser_after_a_restart_loads_older_messages_of_the_new_room_only(chat_process, open_page):
    from playwright.sync_api import expect

    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    first = chat_process(*ports)
    first.urls()
    for n in range(60):  # more than the 50 a page gets on load: older ones can be loaded
        post(first.port, "/messages", {"text": f"old {n + 1}"}, source=f"127.0.0.{2 + n // 20}")
    page = open_page(first.port, "alice")
    older = page.get_by_role("button", name="Load older messages")
    expect(older).to_be_visible()  # ids 11 to 60 are shown; 1 to 10 can be loaded
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(5) == 0

    second = chat_process(*ports)
    second.urls()
    post(second.port, "/messages", {"text": "new 1"})
    expect(texts(page).last).to_have_text("new 1")
    expect(older).to_be_hidden()  # the new room's first message, id 1, is shown: nothing older


@pytest.mark.parametrize("lost", ["both ways", "answers only"])
def test_browser_notices_a_silent_connection_and_sends_what_was_pending_once(
    server, relay, open_page, lost
):
    """The relay stops forwarding: either the message never reaches the server, or it is
    stored and only the answer is lost. Either way it is pending until stored, the status
    leaves "online" within 30 s (the heartbeat), and after the reconnect it is stored once."""
    from playwright.sync_api import expect

    page = open_page(server.port, "alice", clock=True)
    record_statuses(page)
    relay.go_silent(to_server=lost == "both ways")
    say(page, "through the gap")
    expect(page.locator("#outbox .message")).to_contain_text("through the gap")
    expect(page.locator("#outbox .state")).to_have_text("Sending…")
    if lost == "answers only":
        wait_for_health(server.port, messages=1)  # stored; the page has not heard so
    assert stored_texts(server.port) == ([] if lost == "both ways" else ["through the gap"])

    page.clock.run_for(30_000)  # two heartbeats without an answer: the connection is dead
    expect(texts(page)).to_have_text(["through the gap"])
    expect(page.locator("#outbox .message")).to_have_count(0)
    expect(page.locator("#status")).to_have_text("online")
    assert "reconnecting…" in page.evaluate("statuses")
    assert stored_texts(server.port) == ["through the gap"]


def test_browser_gives_up_a_connection_that_never_opens_and_tries_again(server, relay, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice", clock=True)
    relay.wait_for_connection()
    relay.silent_from_the_start = True  # a proxy that takes connections and never answers
    relay.go_silent()
    page.clock.run_for(30_000)
    expect(page.locator("#status")).to_have_text("reconnecting…")
    relay.wait_for_connection()  # the next attempt hangs in its opening handshake
    relay.silent_from_the_start = False
    page.clock.run_for(30_000)
    relay.wait_for_connection()  # given up, and tried again
    expect(page.locator("#status")).to_have_text("online")


def test_browser_keeps_what_is_typed_while_offline_and_sends_it_when_back(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    page.context.set_offline(True)
    expect(page.locator("#status")).to_have_text("reconnecting…")
    say(page, "typed offline")
    expect(page.locator("#outbox .state")).to_contain_text("Not sent yet")
    page.context.set_offline(False)
    expect(texts(page)).to_have_text(["typed offline"])
    expect(page.locator("#outbox .message")).to_have_count(0)
    assert stored_texts(server.port) == ["typed offline"]


def test_browser_too_long_text_stays_in_the_box_with_a_reason(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)
    say(page, "x" * 2001)
    expect(page.locator("#chat-error")).to_have_text("Too long: 2001 characters, at most 2000.")
    expect(page.locator("#message-input")).to_have_value("x" * 2001)


def test_browser_own_messages_are_known_by_ref_not_by_name(server, open_page):
    from playwright.sync_api import expect

    first, second = open_page(server.port, "sam"), open_page(server.port, "sam")
    say(first, "from the first sam")
    expect(texts(second)).to_have_text(["from the first sam"])
    expect(second.locator("#chat-box .message.own")).to_have_count(0)
    first.fill("#name-input", "samuel")
    first.dispatch_event("#name-input", "change")
    expect(first.locator("#chat-box .notice").last).to_have_text("sam is now samuel")
    expect(first.locator("#chat-box .message.own .text")).to_have_text(["from the first sam"])


def layout_reads_script():
    """Counts the page's reads of layout (each can force the browser to lay the page out)."""
    return """
        window.layoutReads = 0;
        for (const key of ["scrollHeight", "scrollTop", "clientHeight", "offsetHeight", "offsetTop"]) {
            const real = Object.getOwnPropertyDescriptor(Element.prototype, key)
                || Object.getOwnPropertyDescriptor(HTMLElement.prototype, key);
            const owner = Element.prototype.hasOwnProperty(key) ? Element.prototype : HTMLElement.prototype;
            Object.defineProperty(owner, key, {...real, get() { window.layoutReads += 1; return real.get.call(this); }});
        }
        const rect = Element.prototype.getBoundingClientRect;
        Element.prototype.getBoundingClientRect = function () { window.layoutReads += 1; return rect.call(this); };
    """


def test_browser_draws_the_history_in_one_batch_without_reading_layout_per_message(server, browser):
    from playwright.sync_api import expect

    seed(50)
    context = browser.new_context()
    try:
        context.add_init_script("localStorage.setItem('chat-name', 'reader')")  # joins at once
        context.add_init_script(layout_reads_script())
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/")
        expect(page.locator("#chat-box .message")).to_have_count(50)
        # A few reads for the whole batch (the scroll position, the box's size), not one per message.
        assert page.evaluate("layoutReads") < 50
        assert at_bottom(page)
    finally:
        context.close()


AT_BOTTOM = (
    "() => { const log = document.getElementById('log'); "
    "return log.scrollHeight - log.scrollTop - log.clientHeight < 2; }"
)


def at_bottom(page):
    """The message log is scrolled to its end."""
    return page.evaluate(AT_BOTTOM)


def test_browser_on_a_phone_stays_at_the_bottom_and_shows_own_messages(server, open_page):
    from playwright.sync_api import expect

    seed(50)
    page = open_page(server.port, "alice", **PHONE)
    expect(texts(page)).to_have_count(50)
    expect(texts(page).last).to_be_in_viewport()
    assert at_bottom(page)
    say(page, "mine\nwith\nseveral\nlines")
    expect(texts(page).last).to_have_text("mine\nwith\nseveral\nlines")
    expect(texts(page).last).to_be_in_viewport()
    say(page, "x" * 2001)  # the error line appears and the log gets shorter
    expect(page.locator("#chat-error")).to_be_visible()
    page.wait_for_function(AT_BOTTOM)


def test_browser_shows_a_new_messages_button_when_scrolled_up(server, open_page):
    from playwright.sync_api import expect

    seed(50)
    page = open_page(server.port)
    expect(texts(page)).to_have_count(50)
    page.locator("#log").evaluate("log => log.scrollTop = 0")
    post(server.port, "/messages", {"text": "while you read"})
    button = page.get_by_role("button", name="New messages")
    expect(button).to_be_visible()
    expect(texts(page).last).not_to_be_in_viewport()
    button.click()
    expect(texts(page).last).to_be_in_viewport()
    expect(button).to_be_hidden()


def test_browser_always_shows_ones_own_message_even_when_scrolled_up(server, open_page):
    from playwright.sync_api import expect

    seed(50)
    page = open_page(server.port)
    expect(texts(page)).to_have_count(50)
    page.locator("#log").evaluate("log => log.scrollTop = 0")
    say(page, "mine")
    expect(texts(page).last).to_have_text("mine")
    expect(texts(page).last).to_be_in_viewport()


def test_browser_counts_unread_messages_in_the_title_while_hidden(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)
    set_hidden = """hidden => {
        Object.defineProperty(document, "hidden", {value: hidden, configurable: true});
        document.dispatchEvent(new Event("visibilitychange"));
    }"""
    page.evaluate(set_hidden, True)
    for text in ["one", "two"]:
        post(server.port, "/messages", {"text": text})
    expect(page).to_have_title("(2) chat")
    page.evaluate(set_hidden, False)
    expect(page).to_have_title("chat")


def test_browser_pasted_lines_are_kept(server, open_page):
    """(Enter and Shift+Enter: in every engine, test_engines.py. Pasting is Playwright's insert_text.)"""
    from playwright.sync_api import expect

    page = open_page(server.port)
    page.locator("#message-input").focus()
    page.keyboard.insert_text("pasted 1\npasted 2\npasted 3")
    page.keyboard.press("Enter")
    expect(texts(page)).to_have_text(["pasted 1\npasted 2\npasted 3"])
    assert stored_texts(server.port) == ["pasted 1\npasted 2\npasted 3"]


def test_browser_online_list_on_a_phone_is_a_count_that_opens_on_tap(server, open_page):
    from playwright.sync_api import expect

    with contextlib.ExitStack() as stack:
        for n in range(40):
            stack.enter_context(joined(server, name=f"person {n}"))
        page = open_page(server.port, "alice", **PHONE)
        summary = page.locator("#online-count")
        expect(summary).to_have_text("41 online")
        expect(page.locator("#online")).to_be_hidden()
        assert page.locator("aside").bounding_box()["height"] < 60
        summary.tap()
        expect(page.locator("#online li")).to_have_count(41)
        expect(page.locator("#online li").first).to_be_visible()


def run_axe(page):
    """axe-core's violations on the page as it is now (axe-core comes from npm: npm ci)."""
    if not AXE.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("the accessibility tests must run under CI: npm ci")
        pytest.skip("no axe-core: npm ci")
    page.evaluate(AXE.read_text())
    violations = page.evaluate("async () => (await axe.run()).violations")
    return [(v["id"], v["impact"], [node["target"] for node in v["nodes"]]) for v in violations]


WORKSHOP_STATES = [
    "code and a right-to-left name",
    "code on a dark phone",
    "offline",
    "first visit",
]


@pytest.mark.parametrize("state", ["dark scheme", *WORKSHOP_STATES])
def test_browser_page_has_no_accessibility_violations(server, open_page, state):
    """Chromium only: Playwright emulates the dark scheme, a phone and going offline. The
    empty room, a busy room, an error and the phone, in every engine:
    test_every_engine_page_has_no_accessibility_violations."""
    from playwright.sync_api import expect

    options = {
        "dark scheme": {"color_scheme": "dark"},
        "code on a dark phone": {**PHONE, "color_scheme": "dark"},
    }.get(state, {})
    if state == "first visit":
        page = open_page(server.port, online=False)
        expect(page.get_by_role("button", name="Join")).to_be_visible()
        assert run_axe(page) == []
        return
    if state == "dark scheme":
        seed(50)
    page = open_page(server.port, "alice", **options)
    if state.startswith("code"):
        post(server.port, "/messages", {"name": RTL_NAME, "text": CODE_MESSAGE + "\n" + RTL_TEXT})
        expect(page.locator("#chat-box pre")).to_be_visible()
    if state == "offline":
        page.context.set_offline(True)
        expect(page.locator("#offline")).to_be_visible()
    if state == "dark scheme":
        expect(texts(page)).to_have_count(50)
        say(page, "mine, see https://example.org")
        expect(texts(page).last).to_have_text("mine, see https://example.org")
    assert run_axe(page) == []


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_browser_inputs_have_a_border_contrast_of_at_least_3(server, open_page, scheme):
    page = open_page(server.port, color_scheme=scheme)
    ratios = page.evaluate("""() => {
        const luminance = (color) => {
            const [r, g, b] = color.match(/\\d+/g).slice(0, 3).map((c) => {
                c /= 255;
                return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
            });
            return 0.2126 * r + 0.7152 * g + 0.0722 * b;
        };
        const contrast = (a, b) => {
            const [light, dark] = [luminance(a), luminance(b)].sort((x, y) => y - x);
            return (light + 0.05) / (dark + 0.05);
        };
        const panel = getComputedStyle(document.getElementById("chat-form")).backgroundColor;
        return ["name-input", "message-input"].map((id) => {
            const style = getComputedStyle(document.getElementById(id));
            return Math.min(contrast(style.borderTopColor, panel), contrast(style.borderTopColor, style.backgroundColor));
        });
    }""")
    assert min(ratios) >= 3, ratios


def test_browser_status_is_read_as_a_word_without_a_bullet(server, open_page):
    page = open_page(server.port)
    assert page.locator("#status").aria_snapshot() == "- status: online"


def test_browser_takes_history_in_pieces_and_presence_changes_from_the_ws_path(server, open_page):
    """Frames in their new form (history pieces with `more` and `online`, presence with only
    `changes`) from a scripted websocket where /config's `ws_path` points."""
    from playwright.sync_api import expect

    sockets = []

    def prepare(context):
        def config(route):
            answer = route.fetch().json()
            route.fulfill(json={**answer, "ws_path": "/ws"})

        context.route("**/config", config)
        context.route_web_socket("**/ws?*", lambda ws: sockets.append(ws))

    page = open_page(server.port, "alice", prepare=prepare, online=False)
    wait_in_page(page, lambda: sockets, timeout=5)  # Playwright calls the route meanwhile
    ws = sockets[0]
    assert ws.url.startswith(f"ws://127.0.0.1:{server.port}/ws?")

    def message(n):
        return {
            "type": "message",
            "id": n,
            "name": "bob",
            "text": f"m{n}",
            "ts": "2026-11-23T14:05:09.123Z",
        }

    first = {
        "type": "history",
        "room": "r",
        "name": "alice",
        "messages": [message(1), message(2)],
        "more": True,
        "online": ["carol", "bob"],
    }
    ws.send(json.dumps(first))
    expect(texts(page)).to_have_text(["m1", "m2"])
    expect(page.locator("#status")).not_to_have_text("online")  # not before the last piece
    ws.send(
        json.dumps(
            {
                "type": "history",
                "room": "r",
                "name": "alice",
                "messages": [message(3)],
                "more": False,
            }
        )
    )
    expect(page.locator("#status")).to_have_text("online")
    ws.send(json.dumps({"type": "presence", "joined": "alice", "changes": [{"joined": "alice"}]}))
    expect(page.locator("#online li")).to_have_text(["alice (you)", "bob", "carol"])
    changes = [
        {"left": "bob"},
        {"renamed": {"from": "carol", "to": "caroline"}},
        {"joined": "dave"},
    ]
    ws.send(json.dumps({"type": "presence", "changes": changes}))
    expect(page.locator("#online li")).to_have_text(["alice (you)", "caroline", "dave"])
    expect(page.locator("#online-count")).to_have_text("3 online")
    expect(texts(page)).to_have_text(["m1", "m2", "m3"])


def test_browser_rename_reaches_the_room_and_is_remembered_after_a_reload(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port)  # a guest: no name remembered yet
    with joined(server, name="watcher") as (watcher, _):
        receive(watcher, "presence")  # its own join
        page.fill("#name-input", "alicia")
        page.press("#name-input", "Tab")  # the name is taken when the field is left
        assert presence_frames(watcher, 1)[0]["changes"][0]["renamed"]["to"] == "alicia"
    page.reload()
    expect(page.locator("#status")).to_have_text("online")
    expect(page.locator("#name-input")).to_have_value("alicia")
    with joined(server, name="watcher") as (watcher, _):
        say(page, "back again")
        assert receive(watcher, "message")["name"] == "alicia"


def test_browser_follows_new_messages_unless_the_reader_scrolled_up(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "reader")
    box = page.locator("#log")  # the scrolling region around the list #chat-box
    seed(60)  # more than the box shows at once
    expect(box).to_contain_text("m60")
    page.wait_for_function(AT_BOTTOM)  # it followed
    assert box.evaluate("box => box.scrollHeight > box.clientHeight")

    box.evaluate("box => { box.scrollTop = 0; }")  # the reader goes back to read
    post(server.port, "/messages", {"text": "while reading"})
    expect(box).to_contain_text("while reading")
    assert box.evaluate("box => box.scrollTop") == 0  # not pulled away from what they read

    box.evaluate("box => { box.scrollTop = box.scrollHeight; }")  # back at the bottom
    post(server.port, "/messages", {"text": "follow again"})
    expect(box).to_contain_text("follow again")
    page.wait_for_function(AT_BOTTOM)


@pytest.mark.parametrize("lost", ["both ways", "answers only"])
def test_browser_a_reload_keeps_what_was_typed_and_sends_what_was_pending_once(
    server, relay, open_page, lost
):
    """The relay goes silent with a message on its way: either it never reached the server or
    only the answer is lost. The reader reloads; the typed text is back in the box and the
    message is stored once, with its ref."""
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    relay.go_silent(to_server=lost == "both ways")
    say(page, "on its way")
    expect(page.locator("#outbox .state")).to_have_text("Sending…")
    if lost == "answers only":
        wait_for_health(server.port, messages=1)
    page.fill("#message-input", "half a thought")
    page.reload()
    expect(page.locator("#message-input")).to_have_value("half a thought")
    expect(page.locator("#status")).to_have_text("online")
    expect(texts(page)).to_have_text(["on its way"])
    expect(page.locator("#chat-box .message.own")).to_have_count(1)  # still known as one's own
    expect(page.locator("#outbox .message")).to_have_count(0)
    assert stored_texts(server.port) == ["on its way"]


def test_browser_offline_shows_a_banner_and_marks_the_online_list_out_of_date(server, open_page):
    from playwright.sync_api import expect

    def form_is_below_the_log():
        log, form = page.locator("#log").bounding_box(), page.locator("#chat-form").bounding_box()
        return form["y"] >= log["y"] + log["height"] - 1

    page = open_page(server.port, "alice")
    banner = page.locator("#offline")
    expect(banner).to_be_hidden()
    assert form_is_below_the_log()
    page.context.set_offline(True)
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("Not connected")
    assert banner.bounding_box()["y"] < page.locator("#log").bounding_box()["y"]
    assert form_is_below_the_log()
    expect(page.locator("#online-count")).to_have_text("1 online (out of date: not connected)")
    page.context.set_offline(False)
    expect(page.locator("#status")).to_have_text("online")
    expect(banner).to_be_hidden()
    expect(page.locator("#online-count")).to_have_text("1 online")


@pytest.mark.parametrize(
    "device, keys",
    [
        ("desktop", "Enter sends, Shift+Enter adds a line"),
        ("touch", "Enter adds a line, the Send button sends"),
    ],
)
def test_browser_the_placeholder_says_what_the_keys_do_on_this_device(
    server, open_page, device, keys
):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice", **(PHONE if device == "touch" else {}))
    placeholder = f"Write a message: {keys}"
    expect(page.locator("#message-input")).to_have_attribute("placeholder", placeholder)


def test_browser_on_a_touch_keyboard_enter_adds_a_line_and_send_sends(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice", **PHONE)
    box = page.locator("#message-input")
    box.tap()
    page.keyboard.type("line one")
    page.keyboard.press("Enter")
    page.keyboard.type("line two")
    expect(box).to_have_value("line one\nline two")
    assert sent_texts(page) == []
    page.get_by_role("button", name="Send").tap()
    expect(texts(page)).to_have_text(["line one\nline two"])
    expect(box).to_be_focused()  # the keyboard stays for the next message


def test_browser_new_messages_button_leaves_the_focus_in_the_conversation(server, open_page):
    from playwright.sync_api import expect

    seed(50)
    page = open_page(server.port, "alice")
    expect(texts(page)).to_have_count(50)
    page.locator("#log").evaluate("log => log.scrollTop = 0")
    post(server.port, "/messages", {"text": "while you read"})
    button = page.get_by_role("button", name="New messages")
    button.focus()
    page.keyboard.press("Enter")
    expect(button).to_be_hidden()
    expect(texts(page).last).to_be_in_viewport()
    expect(page.locator("#log")).to_be_focused()


def test_browser_load_older_messages_leaves_the_focus_in_the_conversation(server, open_page):
    from playwright.sync_api import expect

    seed(120)  # 50 shown, 70 older: one load fetches them all and the button goes
    page = open_page(server.port, "alice")
    expect(texts(page)).to_have_count(50)
    older = page.get_by_role("button", name="Load older messages")
    older.focus()
    page.keyboard.press("Enter")
    expect(texts(page)).to_have_count(120)
    expect(older).to_be_hidden()
    expect(page.locator("#log")).to_be_focused()
