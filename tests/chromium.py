"""Debian's Chromium, headless, as the tests (the `browser` fixture) and the page's benchmark
(tools/bench_page.py) start it through Playwright: one place for both, so neither imports the
other."""

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
