"""Makes docs/screenshot.png: two people chatting, from the real page in headless Chromium;
docs/screenshot-workshop.png and docs/screenshot-workshop-phone.png: code in a message and a
right-to-left name, at desktop and phone size; and with --engines the conversation in each
engine at desktop and phone size: docs/screenshot-ENGINE-SIZE.png.

    python tools/screenshot.py [OUTPUT.png]     # with OUTPUT.png: only the first picture
    python tools/screenshot.py --engines        # and each engine's (those that are here)

Needs what the tests need (requirements-test.txt) and Debian's chromium; for the engines,
firefox-esr, webkit2gtk-driver and xvfb too (see docs/development.md).
"""

import argparse
import json
import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # chat.py, and tests/engines.py and tests/chromium.py
import chat
from tests import engines
from tests.chromium import CHROMIUM, CHROMIUM_FLAGS

CONVERSATION = [
    ("alice", "Hi Bob! Is the websocket server up?"),
    ("bob", "Yes: hug serves this page, websockets carries our messages."),
    ("alice", "And the event loop owns the room, so we see the same order."),
    ("bob", "Even posts from curl land in order. Try <b>this</b>: it stays text."),
]


def make_screenshot(browser, output):
    servers = chat.Servers(chat.Settings(port=0, ws_port=0))
    contexts = []
    try:
        pages = {}
        for name in ("bob", "alice"):
            contexts.append(browser.new_context(viewport={"width": 900, "height": 520}))
            contexts[-1].add_init_script(f"localStorage.setItem('chat-name', '{name}')")
            pages[name] = contexts[-1].new_page()
            pages[name].goto(f"http://127.0.0.1:{servers.port}/")
            expect(pages[name].locator("#status")).to_have_text("online")
        for name, text in CONVERSATION:
            pages[name].fill("#message-input", text)
            pages[name].press("#message-input", "Enter")
        expect(pages["alice"].locator("#chat-box .message")).to_have_count(len(CONVERSATION))
        pages["alice"].fill("#message-input", "Shall we try --host 0.0.0.0 for the whole room?")
        pages["alice"].screenshot(path=str(output))
    finally:
        for context in contexts:
            context.close()
        servers.stop()


SIZES = {"desktop": (900, 520), "phone": (375, 667)}
ONLINE = "() => document.getElementById('status').textContent === 'online'"
SAY = """(text) => {
    const box = document.getElementById("message-input");
    box.focus();
    box.value = text;
    box.dispatchEvent(new Event("input"));
}"""


def make_engine_screenshots(engine, directory):
    """The conversation in `engine`, as alice sees it, at each of SIZES; returns the files."""
    servers = chat.Servers(chat.Settings(port=0, ws_port=0))
    tabs, made = {}, []
    try:
        for name in ("bob", "alice"):
            tabs[name] = engine.new_tab(name=name)
            tabs[name].goto(f"http://127.0.0.1:{servers.port}/")
            tabs[name].wait_for(ONLINE)
        for name, text in CONVERSATION:
            tabs[name].evaluate(SAY, text)
            tabs[name].press("Enter")
            tabs["alice"].wait_for(
                "(text) => [...document.querySelectorAll('#chat-box .message .text')]"
                ".some((p) => p.textContent === text)",
                text,
            )
        tabs["alice"].evaluate(SAY, "Shall we try --host 0.0.0.0 for the whole room?")
        for size, (width, height) in SIZES.items():
            tabs["alice"].set_viewport(width, height)
            tabs["alice"].evaluate("() => new Promise(requestAnimationFrame)")  # laid out
            made.append(Path(directory, f"screenshot-{engine.name}-{size}.png"))
            tabs["alice"].screenshot(made[-1])
        return made
    finally:
        for tab in tabs.values():
            tab.close()
        servers.stop()


STEP_2 = (
    "Step 3 in `steps/step3_room.py`: one room, one order for everyone.\n"
    "```python\n"
    "async def chat(connection):\n"
    "    room.clients.add(connection)\n"
    "    try:\n"
    "        async for text in connection:\n"
    "            broadcast(room.clients, text)  # the same frame to everyone\n"
    "    finally:\n"
    "        room.clients.discard(connection)\n"
    "```"
)
WORKSHOP = [
    ("presenter", STEP_2),
    ("أحمد", "شكرا! يعمل عندي أيضا"),  # Ahmad: "Thanks! It works for me too"
    ("alice", "Mine said `KeyError: 'name'`: I had `data.name` instead of `data[\"name\"]`."),
]
PHONE = {"viewport": {"width": 375, "height": 667}, "is_mobile": True, "has_touch": True}


def make_workshop_screenshots(browser, directory):
    """Code in messages and a right-to-left name, as alice sees them on a laptop and a phone."""
    servers = chat.Servers(chat.Settings(port=0, ws_port=0))
    contexts = []
    try:
        pages = {}
        for name, _ in WORKSHOP:
            contexts.append(browser.new_context(viewport={"width": 900, "height": 560}))
            contexts[-1].add_init_script(f"localStorage.setItem('chat-name', {json.dumps(name)})")
            pages[name] = contexts[-1].new_page()
            pages[name].goto(f"http://127.0.0.1:{servers.port}/")
            expect(pages[name].locator("#status")).to_have_text("online")
        for name, text in WORKSHOP:
            pages[name].fill("#message-input", text)
            pages[name].press("#message-input", "Enter")
            expect(pages["alice"].locator("#chat-box .message").last).to_contain_text(name)
        pages["alice"].screenshot(path=str(Path(directory) / "screenshot-workshop.png"))
        contexts.append(browser.new_context(**PHONE))
        contexts[-1].add_init_script("localStorage.setItem('chat-name', 'alice')")
        phone = contexts[-1].new_page()
        phone.goto(f"http://127.0.0.1:{servers.port}/")
        expect(phone.locator("#chat-box .message")).to_have_count(len(WORKSHOP))
        phone.screenshot(path=str(Path(directory) / "screenshot-workshop-phone.png"))
    finally:
        for context in contexts:
            context.close()
        servers.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", nargs="?", metavar="OUTPUT.png", help="only the first picture")
    parser.add_argument("--engines", action="store_true", help="each engine's pictures too")
    args = parser.parse_args()
    here = ROOT / "docs"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        make_screenshot(chromium, args.output or here / "screenshot.png")
        if not args.output:
            make_workshop_screenshots(chromium, here)
        if args.engines:
            for name in engines.ENGINES:
                if name != "chromium" and (why := engines.missing(name)):
                    print(f"{name}: skipped: {why}", file=sys.stderr)
                    continue
                engine = engines.start(name, chromium)
                try:
                    for made in make_engine_screenshots(engine, here):
                        print(made)
                finally:
                    engine.close()
        chromium.close()
