"""The chat page in three browser engines behind one small interface: a test helper.

    engine = Firefox()              # or WebKit(), or Chromium(playwright_browser)
    tab = engine.new_tab(name="alice", viewport=(375, 667))
    tab.goto("http://127.0.0.1:8000/")
    tab.wait_for("() => document.getElementById('status').textContent === 'online'")
    tab.evaluate("() => document.querySelector('textarea').focus()")
    tab.type("hello")
    tab.press("Enter")
    tab.close()
    engine.close()

- Chromium: Playwright, driving Debian's /usr/bin/chromium (Playwright's own download cannot
  work offline). Its Browser is launched by whoever uses it (the `browser` fixture).
- Firefox: `firefox-esr --headless --remote-debugging-port=0` speaks WebDriver BiDi itself, at
  ws://127.0.0.1:PORT/session. There is no well-kept Python BiDi client, so `Bidi` below is a
  thin one over the project's own `websockets`: a command, its answer; events are ignored.
- WebKit: WebKitGTK's `WebKitWebDriver` (Debian's webkit2gtk-driver) opens MiniBrowser on a
  virtual X display (Xvfb); Selenium drives it, given the driver's path (no driver download).

Each tab is a window of its own, so that every page is visible (a hidden page draws nothing),
and has its own storage, except in WebKit, where one WebDriver session's tabs share an
origin's localStorage: new_tab(name=...) sets "chat-name" just before the page loads, which is
when the page reads it. Scripts given to evaluate() and wait_for() are JavaScript functions,
called with the arguments given after them (strings, numbers, booleans); what they return
(or the value of the promise they return) comes back as JSON would.
"""

import base64
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

FIREFOX = "firefox-esr"
WEBKIT_DRIVER = "WebKitWebDriver"
XVFB = "Xvfb"

# What each engine needs on this machine, and the Debian package that brings it.
# (Chromium's is the `browser` fixture's, which launches it.)
NEEDS = {
    "firefox": [(FIREFOX, "firefox-esr")],
    "webkit": [(WEBKIT_DRIVER, "webkit2gtk-driver"), (XVFB, "xvfb")],
}
ENGINES = ["chromium", *NEEDS]


def missing(engine):
    """Why `engine` cannot run here (a sentence naming what to install), or None."""
    absent = [package for program, package in NEEDS[engine] if not shutil.which(program)]
    if absent:
        return f"{engine} needs: apt-get install {' '.join(absent)}"
    if engine == "webkit" and not importlib.util.find_spec("selenium"):
        return "webkit needs Selenium: python -m pip install -r requirements-test.txt"
    return None


class Tab:
    """One page in one engine. Subclasses drive the engine; waiting is the same for all."""

    def goto(self, url):
        """Loads `url` and returns once its load event has fired."""
        raise NotImplementedError

    def evaluate(self, function, *args):
        """Calls the JavaScript `function` with `args` in the page; its (awaited) result."""
        raise NotImplementedError

    def run_script(self, source):
        """Runs `source` as a classic script of the page would run (a library: axe-core)."""
        raise NotImplementedError

    def type(self, text):
        """Types `text` into the focused element, key by key."""
        raise NotImplementedError

    def press(self, key):
        """Presses one key: "Enter", "Tab", or "Shift+Enter"."""
        raise NotImplementedError

    def set_viewport(self, width, height):
        """Sizes the page's viewport; returns the (width, height) the engine gave it."""
        raise NotImplementedError

    def screenshot(self, path):
        """Saves what the viewport shows as a PNG file."""
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    def viewport(self):
        return tuple(self.evaluate("() => [innerWidth, innerHeight]"))

    def wait_for(self, function, *args, timeout=10, what=None):
        """The first truthy result of `function(*args)` in the page, asked every 50 ms."""
        deadline = time.monotonic() + timeout
        while not (result := self.evaluate(function, *args)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting in the page for {what or function}")
            time.sleep(0.05)
        return result


# --- Chromium: Playwright ----------------------------------------------------------------


class Chromium:
    """Tabs in a Playwright Browser (Chromium): each a new context, with its own storage."""

    name = "chromium"

    def __init__(self, browser):
        self.browser = browser

    def new_tab(self, name=None, viewport=None):
        options = {"viewport": {"width": viewport[0], "height": viewport[1]}} if viewport else {}
        context = self.browser.new_context(**options)
        if name is not None:
            context.add_init_script(f"localStorage.setItem('chat-name', {json.dumps(name)})")
        return ChromiumTab(context)

    def close(self):
        """The Browser belongs to whoever launched it."""


class ChromiumTab(Tab):
    def __init__(self, context):
        self.context = context
        self.page = context.new_page()

    def goto(self, url):
        self.page.goto(url)

    def evaluate(self, function, *args):
        return self.page.evaluate(f"(args) => ({function})(...args)", list(args))

    def run_script(self, source):
        self.page.evaluate(source)

    def type(self, text):
        self.page.keyboard.type(text)

    def press(self, key):
        self.page.keyboard.press(key)

    def set_viewport(self, width, height):
        self.page.set_viewport_size({"width": width, "height": height})
        return self.viewport()

    def screenshot(self, path):
        self.page.screenshot(path=str(path))

    def close(self):
        self.context.close()


# --- Firefox: WebDriver BiDi over websockets ---------------------------------------------

# WebDriver's code points for the keys that are not text.
KEYS = {"Enter": "\ue007", "Tab": "\ue004", "Shift": "\ue008"}


def key_presses(key):
    """ "Shift+Enter" -> the code points to press down in order (and release in reverse)."""
    return [KEYS.get(part, part) for part in key.split("+")]


class Bidi:
    """A WebDriver BiDi session over one websocket: send a command, read until its answer."""

    def __init__(self, url, timeout=30):
        from websockets.sync.client import connect

        # No keepalive thread (the browser is local), and room for a screenshot's base64.
        self.closing = contextlib.ExitStack()
        self.socket = self.closing.enter_context(
            connect(url, max_size=None, ping_interval=None, open_timeout=timeout)
        )
        self.timeout = timeout
        self.last_id = 0
        self.send("session.new", capabilities={})

    def send(self, method, **params):
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # events come in between; nothing here subscribes to any
            answer = json.loads(self.socket.recv(self.timeout))
            if answer.get("id") == self.last_id:
                break
        if answer["type"] == "error":
            raise RuntimeError(f"{method}: {answer['error']}: {answer['message']}")
        return answer["result"]

    def close(self):
        with contextlib.suppress(Exception):
            self.send("session.end")
        self.closing.close()


def from_remote(value):
    """A BiDi RemoteValue as Python: primitives, arrays and plain objects (as JSON would)."""
    kind, inner = value["type"], value.get("value")
    if kind in ("undefined", "null"):
        return None
    if kind == "number" and isinstance(inner, str):
        return float(inner.replace("Infinity", "inf"))  # "NaN", "-0", "Infinity"
    if kind == "array":
        return [from_remote(item) for item in inner]
    if kind == "object":
        return {key: from_remote(item) for key, item in inner}
    if kind in ("string", "number", "boolean"):
        return inner
    return value  # a node, a function...: as BiDi describes it


class Firefox:
    """firefox-esr, headless, driven over WebDriver BiDi; each tab is a window of its own user
    context (its own storage)."""

    name = "firefox"

    def __init__(self, timeout=30):
        self.profile = tempfile.mkdtemp(prefix="chat-firefox-")
        self.log = Path(self.profile, "firefox.log")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [
                    FIREFOX,
                    "--headless",
                    "--remote-debugging-port=0",
                    "--no-remote",
                    "--profile",
                    self.profile,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1"},
            )
        try:
            self.bidi = Bidi(self.listening_url(timeout) + "/session", timeout)
        except BaseException:
            self.stop_process()
            raise

    def listening_url(self, timeout):
        """Firefox picks its port and says so: "WebDriver BiDi listening on ws://..."."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := re.search(r"WebDriver BiDi listening on (ws://\S+)", self.log.read_text()):
                return found[1]
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"Firefox did not start its BiDi server: {self.log.read_text()}")

    def new_tab(self, name=None, viewport=None):
        user_context = self.bidi.send("browser.createUserContext")["userContext"]
        # A window, not a tab: a tab behind another is hidden, and draws nothing (see WebKit).
        context = self.bidi.send("browsingContext.create", type="window", userContext=user_context)
        tab = FirefoxTab(self.bidi, context["context"], user_context)
        if name is not None:
            self.bidi.send(
                "script.addPreloadScript",
                functionDeclaration=f"() => {{ try {{ localStorage.setItem('chat-name', "
                f"{json.dumps(name)}); }} catch {{}} }}",  # about:blank has no storage
                contexts=[tab.context],
            )
        if viewport:
            tab.set_viewport(*viewport)
        return tab

    def close(self):
        self.bidi.close()
        self.stop_process()

    def stop_process(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


class FirefoxTab(Tab):
    def __init__(self, bidi, context, user_context):
        self.bidi, self.context, self.user_context = bidi, context, user_context

    def goto(self, url):
        self.bidi.send("browsingContext.navigate", context=self.context, url=url, wait="complete")

    def evaluate(self, function, *args):
        answer = self.bidi.send(
            "script.callFunction",
            functionDeclaration=function,
            arguments=[to_local(arg) for arg in args],
            target={"context": self.context},
            awaitPromise=True,
            resultOwnership="none",
        )
        if answer["type"] == "exception":
            raise RuntimeError(f"in the page: {answer['exceptionDetails']['text']}")
        return from_remote(answer["result"])

    def run_script(self, source):
        answer = self.bidi.send(
            "script.evaluate",
            expression=source,
            target={"context": self.context},
            awaitPromise=False,
            resultOwnership="none",
        )
        if answer["type"] == "exception":
            raise RuntimeError(f"in the page: {answer['exceptionDetails']['text']}")

    def type(self, text):
        self.keys([action for char in text for action in (("keyDown", char), ("keyUp", char))])

    def press(self, key):
        codes = key_presses(key)
        self.keys([("keyDown", code) for code in codes] + [("keyUp", c) for c in codes[::-1]])

    def keys(self, actions):
        self.bidi.send(
            "input.performActions",
            context=self.context,
            actions=[
                {
                    "type": "key",
                    "id": "keyboard",
                    "actions": [{"type": kind, "value": value} for kind, value in actions],
                }
            ],
        )

    def set_viewport(self, width, height):
        self.bidi.send(
            "browsingContext.setViewport",
            context=self.context,
            viewport={"width": width, "height": height},
        )
        return self.viewport()

    def screenshot(self, path):
        data = self.bidi.send("browsingContext.captureScreenshot", context=self.context)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self):
        self.bidi.send("browsingContext.close", context=self.context)
        self.bidi.send("browser.removeUserContext", userContext=self.user_context)


def to_local(value):
    """A Python string, number or boolean as a BiDi LocalValue."""
    kind = {bool: "boolean", int: "number", float: "number", str: "string"}[type(value)]
    return {"type": kind, "value": value}


# --- WebKit: WebKitWebDriver and Selenium, on a virtual X display ------------------------


class WebKit:
    """WebKitGTK's MiniBrowser, through WebKitWebDriver and Selenium, on its own Xvfb.
    One WebDriver session; each tab is a window of it (one stays open: the session's). Not a
    tab of one window: a tab behind another is hidden, and a hidden page draws nothing (the
    page draws in requestAnimationFrame, which browsers pause for hidden pages)."""

    name = "webkit"

    def __init__(self):
        from selenium import webdriver
        from selenium.webdriver.webkitgtk.options import Options
        from selenium.webdriver.webkitgtk.service import Service

        self.display = VirtualDisplay()
        try:
            options = Options()
            options.add_argument("--automation")  # MiniBrowser obeys WebDriver only so
            service = Service(
                # An explicit path, so that Selenium never runs selenium-manager to fetch one.
                executable_path=shutil.which(WEBKIT_DRIVER),
                env={**os.environ, "DISPLAY": self.display.name},
            )
            with warnings.catch_warnings():
                # Selenium 4.51's own WebKitGTK class passes remote_server_addr, which it
                # deprecated itself; the warning is Selenium's, to Selenium.
                warnings.filterwarnings("ignore", "setting remote_server_addr", DeprecationWarning)
                self.driver = webdriver.WebKitGTK(options=options, service=service)
        except BaseException:
            self.display.stop()
            raise
        self.home = self.driver.current_window_handle
        self.current = self.home

    def switch_to(self, handle):
        if self.current != handle:
            self.driver.switch_to.window(handle)
            self.current = handle

    def new_tab(self, name=None, viewport=None):
        self.switch_to(self.home)
        self.driver.switch_to.new_window("window")
        self.current = self.driver.current_window_handle
        tab = WebKitTab(self, self.current, name)
        if viewport:
            tab.set_viewport(*viewport)
        return tab

    def close(self):
        try:
            self.driver.quit()
        finally:
            self.display.stop()


class WebKitTab(Tab):
    def __init__(self, engine, handle, name):
        self.engine, self.handle, self.name = engine, handle, name
        self.origins = set()  # where the name is set already: a reload keeps a rename

    @property
    def driver(self):
        self.engine.switch_to(self.handle)
        return self.engine.driver

    def goto(self, url):
        # No script runs before a page's own here: the name goes into the origin's storage
        # from a page of that origin first (/config: any page of it would do).
        origin = re.match(r"[a-z]+://[^/]+", url)[0]
        if origin not in self.origins:
            self.origins.add(origin)
            self.driver.get(f"{origin}/config")
            self.driver.execute_script(
                "arguments[0] === null ? localStorage.removeItem('chat-name')"
                " : localStorage.setItem('chat-name', arguments[0])",
                self.name,
            )
        self.driver.get(url)

    def evaluate(self, function, *args):
        # WebDriver's Execute Script runs a function body, and waits for a returned promise.
        return self.driver.execute_script(f"return ({function}).apply(null, arguments)", *args)

    def run_script(self, source):
        self.driver.execute_script(source)

    def type(self, text):
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(text).perform()

    def press(self, key):
        from selenium.webdriver.common.action_chains import ActionChains

        actions = ActionChains(self.driver)
        codes = key_presses(key)
        for code in codes:
            actions.key_down(code)
        for code in codes[::-1]:
            actions.key_up(code)
        actions.perform()

    def set_viewport(self, width, height):
        # WebDriver sizes the window; the toolbar takes some of it. MiniBrowser's window is at
        # least about 450 px wide (its toolbar's width), so a narrower viewport is not had.
        inner_width, inner_height = self.viewport()
        window = self.driver.get_window_rect()
        self.driver.set_window_rect(
            width=window["width"] - inner_width + width,
            height=window["height"] - inner_height + height,
        )
        return self.viewport()

    def screenshot(self, path):
        Path(path).write_bytes(self.driver.get_screenshot_as_png())

    def close(self):
        self.driver.close()
        self.engine.switch_to(self.engine.home)


class VirtualDisplay:
    """An Xvfb server on a display number it picks itself (-displayfd), for MiniBrowser."""

    def __init__(self):
        read, write = os.pipe()
        self.process = subprocess.Popen(
            [XVFB, "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
            pass_fds=[write],
            stderr=subprocess.DEVNULL,
        )
        os.close(write)
        try:
            with os.fdopen(read) as answer:
                number = answer.readline().strip()  # once the display accepts clients
        except BaseException:
            self.stop()
            raise
        if not number:
            self.stop()
            raise RuntimeError("Xvfb did not start")
        self.name = f":{number}"

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def start(name, chromium_browser=None):
    """The engine called `name` (one of ENGINES), started."""
    if name == "chromium":
        return Chromium(chromium_browser)
    return {"firefox": Firefox, "webkit": WebKit}[name]()
