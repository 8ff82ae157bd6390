"""The page for a programming workshop: fenced code as a block with a copy button, right-to-left
names and text that read right, and what the page shows of names and renames.
"""

import json
import re

import pytest

from tests.helpers import (
    CODE_MESSAGE,
    PHONE,
    RTL_NAME,
    RTL_TEXT,
    all_changes,
    get,
    joined,
    post,
    presence_frames,
    receive,
    receive_until,
    say,
    stored_texts,
    texts,
    wait_in_page,
)

pytestmark = pytest.mark.browser


CODE_BLOCK = "def greet(name):\n    return f'<b>{name}</b>'  # see https://example.org/in-code"


def test_browser_shows_fenced_code_as_a_block_and_backticks_as_inline_code(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    post(server.port, "/messages", {"name": "presenter", "text": CODE_MESSAGE})
    text = texts(page).last
    expect(text.locator("pre code")).to_have_text(CODE_BLOCK)  # indentation kept, no fences
    inline = page.locator("#chat-box .message .text > code")
    expect(inline).to_have_text("python chat.py --open")
    assert "```" not in text.text_content() and "`" not in text.text_content()
    for code in (text.locator("pre"), inline):
        assert "monospace" in code.evaluate("e => getComputedStyle(e).fontFamily")
    assert text.locator("pre").evaluate("e => getComputedStyle(e).whiteSpace") == "pre"
    expect(text.locator("b, script, img")).to_have_count(0)  # code stays text
    expect(text.locator("code a")).to_have_count(0)  # an address inside code is not a link
    expect(text.locator("a")).to_have_attribute("href", "https://example.org/docs")


def test_browser_text_without_a_closing_fence_stays_as_typed(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    post(server.port, "/messages", {"text": "``` not closed, and ``"})
    expect(texts(page)).to_have_text(["``` not closed, and ``"])
    expect(texts(page).locator("code")).to_have_count(0)


def test_browser_a_code_block_scrolls_sideways_on_a_phone_and_the_page_does_not(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice", **PHONE)
    long_line = "    " + "x = 1; " * 40
    post(server.port, "/messages", {"text": f"```\n{long_line}\n```"})
    pre = texts(page).last.locator("pre")
    expect(pre).to_have_text(long_line)
    assert pre.evaluate("pre => pre.scrollWidth > pre.clientWidth")  # it scrolls, not wraps
    assert pre.bounding_box()["height"] < 60  # one line
    assert page.locator("#log").evaluate("log => log.scrollWidth <= log.clientWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_browser_copy_puts_the_code_on_the_clipboard(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice", permissions=["clipboard-read", "clipboard-write"])
    post(server.port, "/messages", {"text": CODE_MESSAGE})
    copy = texts(page).last.get_by_role("button")  # "Copy", then what it did
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == CODE_BLOCK


def test_browser_without_the_clipboard_api_copy_selects_the_code(server, open_page):
    """Plain http on a LAN address has no navigator.clipboard (secure contexts only)."""
    from playwright.sync_api import expect

    def no_clipboard_api(context):
        context.add_init_script(
            "Object.defineProperty(Navigator.prototype, 'clipboard', {get: () => undefined})"
        )

    page = open_page(server.port, "alice", prepare=no_clipboard_api)
    post(server.port, "/messages", {"text": CODE_MESSAGE})
    copy = texts(page).last.get_by_role("button")  # "Copy", then what it did
    copy.click()
    expect(copy).to_have_text("Selected: copy it")
    assert page.evaluate("getSelection().toString()") == CODE_BLOCK


def test_browser_a_right_to_left_name_keeps_the_header_in_order_and_rtl_text_reads_right(
    server, open_page
):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    post(server.port, "/messages", {"name": RTL_NAME, "text": RTL_TEXT})
    message = page.locator("#chat-box .message").last
    expect(message.locator("strong bdi")).to_have_text(RTL_NAME)
    name, time_ = message.locator("strong").bounding_box(), message.locator("time").bounding_box()
    assert name["x"] + name["width"] <= time_["x"]  # the name, then the time: not split
    text = message.locator(".text")
    assert text.evaluate("e => getComputedStyle(e).direction") == "rtl"
    # the text sits on the right of its bubble, where right-to-left reading begins
    right_edges = text.evaluate("""e => {
        const range = document.createRange();
        range.selectNodeContents(e);
        return [range.getBoundingClientRect().right, e.getBoundingClientRect().right];
    }""")
    assert abs(right_edges[0] - right_edges[1]) < 2, right_edges


def test_browser_names_in_notices_and_the_online_list_are_isolated(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    with joined(server, name=RTL_NAME):
        expect(page.locator("#chat-box .notice").last).to_have_text(f"{RTL_NAME} joined")
        expect(page.locator("#chat-box .notice bdi").last).to_have_text(RTL_NAME)
        expect(page.locator("#online li bdi")).to_have_text(["alice", RTL_NAME])


def test_browser_the_name_box_takes_32_characters_even_of_emoji(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    with joined(server, name="watcher") as (watcher, _):
        receive(watcher, "presence")  # its own join
        page.fill("#name-input", "😀" * 40)  # 80 UTF-16 units; maxlength would stop at 16 emoji
        expect(page.locator("#name-input")).to_have_value("😀" * 32)
        expect(page.locator("#chat-error")).to_have_text("A name has at most 32 characters.")
        page.press("#name-input", "Enter")
        change = presence_frames(watcher, 1)[0]["changes"][0]
        assert change == {"renamed": {"from": "alice", "to": "😀" * 32}}


def scripted_room():
    """`prepare` for open_page: the page's websocket goes to the test, which plays the server
    (for frames the server in this branch does not send yet, or in an order it cannot be made
    to send them). Returns (prepare, sockets)."""
    sockets = []

    def prepare(context):
        context.route_web_socket("**/*", lambda ws: sockets.append(ws))

    return prepare, sockets


def scripted_history(ws, name, online):
    history = {"type": "history", "room": "r", "name": name, "messages": [], "more": False}
    ws.send(json.dumps({**history, "online": online}))


def test_browser_a_refused_rename_puts_the_room_s_name_back_in_the_box_with_the_reason(
    server, open_page
):
    """The error frame the server sends for a refused rename: its `name` is the name the room
    still knows, its text begins "rename refused: "."""
    from playwright.sync_api import expect

    prepare, sockets = scripted_room()
    page = open_page(server.port, "n20", prepare=prepare, online=False)
    wait_in_page(page, lambda: sockets, timeout=5)
    scripted_history(sockets[0], "n20", ["n20", "n24"])
    expect(page.locator("#status")).to_have_text("online")
    asked = []
    sockets[0].on_message(lambda frame: asked.append(json.loads(frame)))
    page.fill("#name-input", "n24")
    page.press("#name-input", "Enter")
    wait_in_page(page, lambda: asked, timeout=5)
    assert asked == [{"type": "name", "name": "n24"}]
    refusal = "rename refused: n24 is the name of someone else here"
    sockets[0].send(json.dumps({"type": "error", "error": refusal, "name": "n20"}))
    expect(page.locator("#name-input")).to_have_value("n20")
    expect(page.locator("#chat-error")).to_have_text(refusal)
    assert page.evaluate("localStorage.getItem('chat-name')") == "n20"
    expect(page.locator("#online .self")).to_have_text("n20 (you)")


def name_frames(page):
    frames = [json.loads(frame) for frame in page.sent_frames]
    return [frame for frame in frames if isinstance(frame, dict) and frame.get("type") == "name"]


def test_browser_a_rename_to_the_same_name_sends_nothing(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, "alice")
    page.fill("#name-input", " alice ")
    page.press("#name-input", "Enter")
    page.press("#name-input", "Tab")
    page.fill("#name-input", "alicia")
    page.press("#name-input", "Tab")
    wait_in_page(page, lambda: name_frames(page))
    assert name_frames(page) == [{"type": "name", "name": "alicia"}]
    expect(page.locator("#chat-box .notice", has_text="is now")).to_have_text(
        ["alice is now alicia"]
    )


def test_browser_the_online_list_marks_oneself_among_people_of_the_same_name(server, open_page):
    from playwright.sync_api import expect

    first, second = open_page(server.port, "sam"), open_page(server.port, "sam")
    bob = open_page(server.port, "bob")
    for page in (first, second):
        expect(page.locator("#online li")).to_have_text(["bob", "sam (you)", "sam"])
    expect(bob.locator("#online li")).to_have_text(["bob (you)", "sam", "sam"])
    expect(bob.locator("#online .self")).to_have_count(1)


def test_browser_a_first_time_visitor_is_heard_of_once_under_the_chosen_name(server, open_page):
    from playwright.sync_api import expect

    with joined(server, name="watcher") as (watcher, _):
        receive(watcher, "presence")  # its own join
        page = open_page(server.port, online=False)  # nothing kept: a first-time visitor
        name_box = page.locator("#name-input")
        expect(name_box).to_be_focused()
        expect(name_box).to_have_value(re.compile(r"^guest-\d+$"))  # a suggestion
        expect(page.get_by_role("button", name="Join")).to_be_visible()
        expect(page.locator("#status")).to_have_text("not in the chat yet")
        assert get(server.port, "/health")[1]["clients"] == 1  # not joined: only the watcher

        name_box.fill("alice")
        name_box.press("Enter")
        expect(page.locator("#status")).to_have_text("online")
        expect(page.locator("#message-input")).to_be_focused()
        say(page, "hello")
        frames = receive_until(
            watcher,
            lambda frames: frames and frames[-1]["type"] == "message",
            ("presence", "message"),
        )
        assert all_changes(frames[:-1]) == [{"joined": "alice"}]
        assert frames[-1]["name"] == "alice"
        assert page.evaluate("localStorage.getItem('chat-name')") == "alice"


def test_browser_a_first_time_visitor_may_join_with_the_button_and_a_message(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server.port, online=False)
    page.fill("#message-input", "hello from a newcomer")
    page.get_by_role("button", name="Join").click()
    expect(texts(page)).to_have_text(["hello from a newcomer"])
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    assert stored_texts(server.port) == ["hello from a newcomer"]


@pytest.mark.parametrize(
    "changes, summary",
    [
        (
            [{"joined": "a"}, {"joined": "b"}, {"joined": "c"}, {"left": "d"}]
            + [{"renamed": {"from": "e", "to": "f"}}, {"renamed": {"from": "g", "to": "h"}}],
            "3 joined, 1 left, 2 renamed",
        ),
        ([{"renamed": {"from": f"n{n}", "to": f"m{n}"}} for n in range(4)], "4 renamed"),
    ],
)
def test_browser_a_summary_of_many_changes_counts_renames_and_leaves_out_zeros(
    server, open_page, changes, summary
):
    from playwright.sync_api import expect

    prepare, sockets = scripted_room()
    page = open_page(server.port, "alice", prepare=prepare, online=False)
    wait_in_page(page, lambda: sockets, timeout=5)
    scripted_history(sockets[0], "alice", ["alice", "d", "e", "g", "n0", "n1", "n2", "n3"])
    expect(page.locator("#status")).to_have_text("online")
    sockets[0].send(json.dumps({"type": "presence", "changes": changes}))
    expect(page.locator("#chat-box .notice")).to_have_text([summary])


def test_browser_notices_with_long_names_wrap_on_a_360_pixel_phone(server, open_page):
    from playwright.sync_api import expect

    long_name = "W" * 32
    page = open_page(server.port, "alice", **{**PHONE, "viewport": {"width": 360, "height": 640}})
    with joined(server, name=long_name) as (ws, _):
        expect(page.locator("#chat-box .notice").last).to_contain_text(f"{long_name} joined")
        ws.send(json.dumps({"type": "name", "name": "V" * 32}))  # a join and a rename: one notice
        expect(page.locator("#chat-box .notice").last).to_contain_text("is now")
    for notice in page.locator("#chat-box .notice").all():
        box = notice.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 360
    assert page.locator("#log").evaluate("log => log.scrollWidth <= log.clientWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360


def test_browser_right_to_left_text_and_names_read_right_while_typed_too(server, open_page):
    """The message shows "مرحبا!" with the "!" at its left end (dir="auto"); the box it was
    typed in put it at the right end, and the name box did the same with an Arabic name."""
    page = open_page(server.port, "alice")
    page.fill("#message-input", "مرحبا!")
    page.fill("#name-input", "سارة")
    for box in ["#message-input", "#name-input"]:
        assert page.locator(box).evaluate("box => box.matches(':dir(rtl)')"), box
    page.fill("#message-input", "hello")
    assert page.locator("#message-input").evaluate("box => box.matches(':dir(ltr)')")


def test_browser_a_reconnect_while_a_new_name_is_being_typed_keeps_both_names_apart(
    server, open_page
):
    """The page reconnected under whatever was in the name box (the room heard "ali joined"
    from a half-typed name) and then wrote the room's answer over what was being typed."""
    from playwright.sync_api import expect

    alice = open_page(server.port, "alice")
    bob = open_page(server.port, "bob")
    alice.press("#name-input", "End")
    alice.keyboard.type("-typing")  # not taken yet: no Enter
    alice.context.set_offline(True)
    expect(alice.locator("#offline")).to_be_visible()
    alice.context.set_offline(False)
    expect(alice.locator("#status")).to_have_text("online")
    expect(alice.locator("#name-input")).to_be_focused()
    expect(alice.locator("#name-input")).to_have_value("alice-typing")
    expect(bob.locator("#online li")).to_have_text(["alice", "bob (you)"])
    alice.press("#name-input", "Enter")
    expect(bob.locator("#online li")).to_have_text(["alice-typing", "bob (you)"])
