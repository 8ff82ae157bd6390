"""How much the page costs the browser in a busy room: chat.html against an older page.

    python tools/bench_page.py [--quick] [--json FILE]

Runs the chat in this process and each page in headless Chromium (Debian's, as the tests).
Messages are posted straight into the room (past the rate limit, as bench_chat.py's load
would be), and the page's main-thread time is read from Chrome's own counter (CDP
`Performance.getMetrics`, `TaskDuration`: every task the page ran: script, style, layout).

- per-append cost: after N messages received, 50 more come one every 20 ms; the main-thread
  time they cost, divided by 50. A page that reads the layout per message and keeps every
  message gets slower as N grows; a bounded one stays flat.
- lag at 100 messages a second: each message carries the time it was posted; the page's
  drawing of it is timed by a MutationObserver the benchmark adds. Reported: the worst lag,
  and how long after the last post the last message was on screen.

Needs what the tests need (requirements-test.txt) and Debian's chromium. The older page
comes from git (commit BEFORE); `--baseline FILE` names another page to compare.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # chat.py, and tests/chromium.py
import chat
from tests.chromium import CHROMIUM, CHROMIUM_FLAGS

BEFORE = "2736747"  # chat.html before it learned to keep its promises (docs/performance.md)
WINDOW = 50  # messages per per-append measurement

# Counts the messages the page has drawn and how late each was (its text is "n posted_ms").
PROBE = """
window.drawn = 0;
window.lags = [];  // ms from post to drawn, by message number
addEventListener("DOMContentLoaded", () => {
    new MutationObserver((records) => {
        for (const record of records) for (const node of record.addedNodes) {
            if (!node.classList || !node.classList.contains("message")) continue;
            const [n, posted] = node.querySelector(".text, p").textContent.split(" ").map(Number);
            if (n > window.drawn) window.drawn = n;
            window.lags[n] = Date.now() - posted;
        }
    }).observe(document.getElementById("chat-box"), {childList: true});
});
"""


def post(room, count, start, every=0.0):
    """Posts messages start+1 .. start+count into the room, one every `every` seconds."""
    began = time.perf_counter()
    for n in range(start + 1, start + count + 1):
        if every:
            wait = began + (n - start - 1) * every - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        chat.ask_room(room, room.post("load", f"{n} {time.time() * 1000:.0f}"))


def wait_drawn(page, n, timeout=600):
    page.wait_for_function(f"() => window.drawn >= {n}", polling=50, timeout=timeout * 1000)


def main_thread_seconds(cdp):
    metrics = cdp.send("Performance.getMetrics")["metrics"]
    return next(m["value"] for m in metrics if m["name"] == "TaskDuration")


def open_page(browser, servers):
    context = browser.new_context()
    context.add_init_script("localStorage.setItem('chat-name', 'reader')")  # a returning visitor
    context.add_init_script(PROBE)
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{servers.port}/")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('online')")
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    return context, page, cdp


def per_append(browser, levels):
    """Milliseconds of main thread per message, at each level of messages received."""
    servers = chat.Servers(chat.Settings(port=0, ws_port=0, history=1000))
    context, page, cdp = open_page(browser, servers)
    try:
        costs, received = {}, 0
        for level in levels:
            while received < level - WINDOW:  # fill up, in bursts the page draws together
                burst = min(100, level - WINDOW - received)
                post(servers.room, burst, received)
                received += burst
                wait_drawn(page, received)
            before = main_thread_seconds(cdp)
            post(servers.room, WINDOW, received, every=0.02)
            received += WINDOW
            wait_drawn(page, received)
            costs[level] = (main_thread_seconds(cdp) - before) * 1000 / WINDOW
        return costs
    finally:
        context.close()
        servers.stop()


def lag(browser, rate, seconds):
    """Worst lag (s), and the last message's: how far behind the page is when the load stops."""
    servers = chat.Servers(chat.Settings(port=0, ws_port=0, history=1000))
    context, page, _ = open_page(browser, servers)
    try:
        count = rate * seconds
        post(servers.room, count, 0, 1 / rate)
        wait_drawn(page, count)
        lags = [lag for lag in page.evaluate("lags") if lag is not None]  # a page may skip some
        return {
            "worst_lag_s": max(lags) / 1000,
            "behind_at_end_s": page.evaluate(f"lags[{count}]") / 1000,
        }
    finally:
        context.close()
        servers.stop()


def baseline_page(path):
    if path:
        return Path(path).read_text(encoding="utf-8")
    where = Path(__file__).resolve().parent.parent  # the repository
    return subprocess.run(
        ["git", "show", f"{BEFORE}:chat.html"],
        cwd=where,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def measure(browser, name, html, levels, rate, seconds):
    with tempfile.TemporaryDirectory() as directory:
        chat.PAGE = Path(directory, "chat.html")
        chat.PAGE.write_text(html, encoding="utf-8")
        print(f"{name}: per-append cost...", file=sys.stderr, flush=True)
        costs = per_append(browser, levels)
        print(f"{name}: {rate} messages/s for {seconds} s...", file=sys.stderr, flush=True)
        return {"page": name, "per_append_ms": costs, **lag(browser, rate, seconds)}


def table(rows, levels):
    head = (
        "| page | "
        + " | ".join(f"ms per append at {n:,}" for n in levels)
        + " | worst lag | behind at the end |"
    )
    lines = [head, "|" + "---|" * (len(levels) + 3)]
    for row in rows:
        costs = " | ".join(f"{row['per_append_ms'][n]:.2f}" for n in levels)
        lines.append(
            f"| {row['page']} | {costs} | {row['worst_lag_s']:.2f} s | {row['behind_at_end_s']:.2f} s |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description="The page's cost in a busy room, against an older page."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="50 and 1,000 messages and 10 s of load: under a minute",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--baseline",
        metavar="HTML",
        help="the page to compare with (default: git show BEFORE:chat.html)",
    )
    args = parser.parse_args()
    levels = [50, 1000] if args.quick else [50, 1000, 5000]
    seconds = 10 if args.quick else 50
    pages = [
        ("chat.html", chat.PAGE.read_text(encoding="utf-8")),
        (f"the page of {BEFORE}", baseline_page(args.baseline)),
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            rows = [measure(browser, name, html, levels, 100, seconds) for name, html in pages]
        finally:
            browser.close()
    print(table(rows, levels))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
