"""Makes docs/screenshot.png: two people chatting, from the real page in headless Chromium.

    python docs/screenshot.py [OUTPUT.png]

Needs what the tests need (requirements-test.txt) and Debian's chromium.
"""

import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # chat.py and chromium.py
import chat
from chromium import CHROMIUM, CHROMIUM_FLAGS

CONVERSATION = [
    ("alice", "Hi Bob! Is the websocket server up?"),
    ("bob", "Yes: hug serves this page, websockets carries our messages."),
    ("alice", "And the event loop owns the room, so we see the same order."),
    ("bob", "Even posts from curl land in order. Try <b>this</b>: it stays text."),
]


def make_screenshot(browser, output):
    servers = chat.Servers("127.0.0.1", 0, 0)
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


if __name__ == "__main__":
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        make_screenshot(
            chromium,
            sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("screenshot.png"),
        )
        chromium.close()
