"""The workshop: the README's walkthrough run as written, and the steps in steps/ each keeping
their promise.
"""

import ast
import contextlib
import functools
import http.client
import importlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse

import pytest
from websockets.sync.client import connect

from tests.helpers import (
    CHAT_PY,
    ChatProcess,
    get,
    post,
    qr_lines,
    receive,
    receive_until,
    record_statuses,
    request,
    say,
    shows_qr_code_of,
    texts,
)

# --- The workshop walkthrough, run as the README writes it -----------------------------
# Every shell command of the README's walkthrough runs as written (real curl, the real
# `python -m websockets` client fed through its stdin), with the ports swapped for free ones,
# and what the README says you will see is checked. A command the test does not know, or one
# it looks for and cannot find, fails the test: a walkthrough step cannot break silently.

README = CHAT_PY.with_name("README.md")
ESCAPES = re.compile(r"\x1b(\[[0-9;]*[A-Za-z]|[78])")  # the interactive client's cursor moves
COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # the QR code's black on white, as a reader sees it


class Walkthrough:
    """The README's walkthrough: its shell commands, and its example output blocks."""

    def __init__(self, port, ws_port):
        section = (
            README.read_text(encoding="utf-8")
            .split("## Workshop walkthrough", 1)[1]
            .split("\n## ", 1)[0]
        )
        blocks = re.findall(r"```(\w*)\n(.*?)```", section, flags=re.DOTALL)
        self.commands = [
            line
            for kind, body in blocks
            if kind == "sh"
            for line in body.replace("\\\n", "").splitlines()
            if line.strip()
        ]
        self.outputs = [body for kind, body in blocks if kind == ""]
        self.port, self.ws_port = port, ws_port
        self.unused = list(self.commands)

    def take(self, pattern):
        """The one command that matches `pattern` (a regex, matched whole), ports swapped."""
        found = [
            command for command in self.commands if re.fullmatch(pattern, " ".join(command.split()))
        ]
        assert len(found) == 1, (
            f"the README's walkthrough has {found} for {pattern!r}: update the README or this test"
        )
        self.unused.remove(found[0])
        return self.swap_ports(found[0])

    def listening(self, terminal, http=True):
        """The URL lines a server printed; the README's ports stand for theirs from now on.

        Servers start on port 0, not on ports the test picked: a port found free may be taken
        by the time a slow-starting process binds it, on a machine that runs much else."""
        printed = [terminal.expect("Chat page:")] if http else []
        printed.append(terminal.expect("Websocket:"))
        ports = [int(line.rsplit(":", 1)[1].strip("/")) for line in printed]
        self.port, self.ws_port = ports if http else (self.port, *ports)
        return printed

    def output(self, first):
        """The one example output block that begins with `first`, ports swapped."""
        found = [body for body in self.outputs if body.startswith(first)]
        assert len(found) == 1, f"the README's walkthrough has {len(found)} outputs like {first!r}"
        return self.swap_ports(found[0])

    def swap_ports(self, text):
        return text.replace(":8000", f":{self.port}").replace(":8765", f":{self.ws_port}")


STARTING = 60  # seconds a process may take to print its first line


class Terminal:
    """A command typed into a shell, as a reader would: lines go to its stdin, output is read back."""

    def __init__(self, command):
        command = re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", command)
        self.process = subprocess.Popen(
            ["bash", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=CHAT_PY.parent,
        )
        self.heard = False  # whether it printed anything yet
        self.lines, self.errors = queue.Queue(), []  # stderr: curl's progress meter, tracebacks
        self.readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=lambda: self.errors.extend(self.process.stderr), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self):
        for line in self.process.stdout:
            for part in ESCAPES.sub("\n", COLOURS.sub("", line)).splitlines():
                self.lines.put(part.removeprefix("> "))

    def type(self, line):
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def expect(self, wanted, timeout=10):
        """The next output line for which `wanted(line)` is true (or that starts with `wanted`)."""
        check = wanted if callable(wanted) else lambda line: line.startswith(wanted)
        seen = []
        while True:
            try:
                # A first line waits for Python to start, which takes long on a loaded machine.
                line = self.lines.get(timeout=timeout if self.heard else max(timeout, STARTING))
                self.heard = True
            except queue.Empty:
                errors = "".join(self.errors)[-2000:]
                raise AssertionError(
                    f"never saw {wanted!r}; saw {seen}; stderr: {errors}"
                ) from None
            seen.append(line)
            if check(line):
                return line

    def expect_frame(self, kind, **fields):
        """The next frame (`< {...}` from the interactive client) of this type with these fields."""

        def matches(line):
            if not line.startswith("< {"):
                return False
            frame = json.loads(line[2:])
            return frame["type"] == kind and all(
                frame.get(key) == value for key, value in fields.items()
            )

        return json.loads(self.expect(matches)[2:])

    def output(self, timeout=10):
        """Everything it printed, once it has finished."""
        self.process.wait(timeout)
        self.readers[0].join(timeout)
        return "\n".join(self.lines.queue)

    def close(self):
        """Ctrl+D, as the README says; then make sure it is gone."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for reader in self.readers:
            reader.join(5)
        self.process.stdout.close()
        self.process.stderr.close()
        if not self.process.stdin.closed:
            self.process.stdin.close()


@pytest.fixture
def terminals():
    opened = []

    def open_terminal(command):
        opened.append(Terminal(command))
        return opened[-1]

    yield open_terminal
    for terminal in opened:
        if terminal.process.poll() is None:
            terminal.process.send_signal(signal.SIGINT)  # Ctrl+C
        terminal.close()
        assert "Traceback" not in "".join(terminal.errors)


def stopped_by_ctrl_c(terminal):
    """Ctrl+C, as a reader stops a step before the next one: exit status 0."""
    terminal.process.send_signal(signal.SIGINT)
    assert terminal.process.wait(10) == 0


@pytest.mark.timeout(240)  # a dozen processes, each started as the reader starts it
def test_the_workshop_walkthrough_works_as_written(terminals):
    if shutil.which("curl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the walkthrough test must run under CI: apt-get install curl")
        pytest.skip("no curl on this machine: apt-get install curl")
    steps = Walkthrough(8000, 8765)  # each server below picks free ports (0), and they count

    # Step 1: the echo server prints its URL; what you type in the client comes back.
    step1 = terminals(steps.take(r"python steps/step1_echo\.py") + " --ws-port 0")
    assert (
        steps.listening(step1, http=False)
        == steps.swap_ports("Websocket:  ws://127.0.0.1:8765/").splitlines()
    )
    echo = terminals(steps.take(r"python -m websockets ws://127\.0\.0\.1:8765/"))
    echo.expect("Connected to")
    echo.type("hello")
    echo.expect("< hello")
    echo.close()
    stopped_by_ctrl_c(step1)

    # Step 2: alice and bob each get history first; "hello" from alice reaches both.
    step2 = terminals(steps.take(r"python steps/step2_room\.py") + " --ws-port 0")
    steps.listening(step2, http=False)
    step2_ws_port = steps.ws_port
    alice_command = steps.take(r'python -m websockets "ws://127\.0\.0\.1:8765/\?name=alice"')
    bob_command = steps.take(r'python -m websockets "ws://127\.0\.0\.1:8765/\?name=bob"')
    alice, bob = terminals(alice_command), terminals(bob_command)
    for person in (alice, bob):
        person.expect_frame("history")
    alice.type("hello")
    for person in (alice, bob):
        assert person.expect_frame("message", text="hello") | {"ts": "..."} == {
            "type": "message",
            "id": 1,
            "name": "alice",
            "text": "hello",
            "ts": "...",
        }
    for frame in steps.output('{"type": "message"').splitlines():  # the JSON frames shown
        alice.type(frame)
    assert bob.expect_frame("message", text="hi")["name"] == "alice"
    bob.expect(lambda line: line.startswith("< {") and '"to": "alice2"' in line)
    alice.close()
    bob.close()
    stopped_by_ctrl_c(step2)

    # Step 3: curl posts; a websocket client sees it; GET /messages lists it.
    step3 = terminals(steps.take(r"python steps/step3_hug\.py") + " --port 0 --ws-port 0")
    steps.listening(step3)
    with connect(f"ws://127.0.0.1:{steps.ws_port}/?name=watcher") as watcher:
        receive(watcher, "history")
        posted = terminals(
            steps.take(r"curl -X POST http://127\.0\.0\.1:8000/messages .*hello from HTTP.*")
        )
        assert json.loads(posted.output())["text"] == "hello from HTTP"
        assert receive(watcher, "message")["name"] == "curl"
    listed = terminals(steps.take(r'curl "http://127\.0\.0\.1:8000/messages\?since=0"'))
    assert [m["text"] for m in json.loads(listed.output())["messages"]] == ["hello from HTTP"]
    stopped_by_ctrl_c(step3)

    # Step 4: chat.py prints the URLs the README shows (here on free ports).
    server = terminals(steps.take(r"python chat\.py") + " --port 0 --ws-port 0")
    printed = [*steps.listening(server), server.expect("Invitation:")]
    assert printed == steps.output("Chat page:  http://127.0.0.1:8000/").splitlines()

    # Step 1 lives on at /echo.
    echo = terminals(steps.take(r"python -m websockets ws://127\.0\.0\.1:8765/echo"))
    echo.expect("Connected to")
    echo.type("hello")
    echo.expect("< hello")
    echo.close()

    # Resuming: alice and bob as in step 2; bob leaves, alice says more, bob comes back.
    alice, bob = (
        terminals(command.replace(f":{step2_ws_port}/", f":{steps.ws_port}/"))
        for command in (alice_command, bob_command)
    )
    for person in (alice, bob):
        person.expect_frame("history")
    for text in ["first", "second"]:
        alice.type(text)
        bob.expect_frame("message", text=text)
    bob.close()
    for text in ["while bob was away", "and more"]:
        alice.type(text)
        alice.expect_frame("message", text=text)
    bob = terminals(steps.take(r'python -m websockets "ws://127\.0\.0\.1:8765/\?name=bob&since=1"'))
    history = bob.expect_frame("history")
    assert [m["text"] for m in history["messages"]] == ["second", "while bob was away", "and more"]

    # Health and bad input: a 400 naming the problem over HTTP; an error frame over the websocket.
    health = terminals(steps.take(r"curl http://127\.0\.0\.1:8000/health"))
    assert json.loads(health.output())["status"] == "ok"
    bad = terminals(steps.take(r"curl -X POST http://127\.0\.0\.1:8000/messages .*\{oops'"))
    assert "not valid JSON" in json.loads(bad.output())["errors"]["body"]
    alice.type("")
    assert alice.expect_frame("error")["error"] == "text is empty"
    alice.type("still here")
    alice.expect_frame("message", text="still here")

    # Start-up and shutdown: port 0 picks free ports; Ctrl+C stops it, exit status 0.
    another = terminals(steps.take(r"python chat\.py --port 0 --ws-port 0"))
    assert re.fullmatch(r"Chat page:  http://127\.0\.0\.1:[1-9]\d*/", another.expect("Chat page:"))
    assert re.fullmatch(r"Websocket:  ws://127\.0\.0\.1:[1-9]\d*/", another.expect("Websocket:"))
    another.process.send_signal(signal.SIGINT)
    another.expect("Stopped.")
    assert another.process.wait(5) == 0

    # 8. A workshop room: every printed address opens (never 0.0.0.0), loopback last.
    room = terminals(steps.take(r"python chat\.py --host 0\.0\.0\.0") + " --port 0 --ws-port 0")
    printed = [room.expect("Chat page:"), room.expect("Websocket:")]
    while "//127.0.0.1:" not in printed[-2]:  # up to the loopback pair, which comes last
        printed += [room.expect("Chat page:"), room.expect("Websocket:")]
    links = [urllib.parse.urlsplit(line.split()[-1]) for line in printed[-2:]]
    steps.port, steps.ws_port = (link.port for link in links)
    key = links[0].query  # key=..., its own in each run
    shown = steps.swap_ports(steps.outputs[-1]).splitlines()
    links = ("Chat page:", "Websocket:")
    expected = [re.sub(r"key=[\w-]+", key, line) for line in shown if line.startswith(links)]
    assert expected[-2:] == printed[-2:]
    assert "0.0.0.0" not in "".join(printed)
    link = printed[0].split()[-1]
    invitation = link.replace("/?", "/invite?")  # at the first address too
    assert room.expect("Invitation:") == f"Invitation: {invitation} (for the projector)"
    assert shown[len(expected)].startswith("Invitation: ")  # the README shows it there
    qr_code = [room.expect(lambda line: True) for _ in range(qr_lines(link))]
    assert shows_qr_code_of(qr_code, link)  # of the first link, for phones to scan
    readme = steps.outputs[-1].splitlines()  # its ports as the README has them
    assert shows_qr_code_of(readme[len(expected) + 1 :], readme[0].split()[-1])  # and the README's
    for line in printed[::2]:
        page = urllib.parse.urlsplit(line.split()[-1])
        connection = http.client.HTTPConnection(page.hostname, page.port, timeout=10)
        for path, status in [("/health", 200), ("/", 401), (f"/?{key}", 303)]:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            assert response.status == status  # the link gets in; the address alone does not
        connection.close()

    assert steps.unused == [], "walkthrough commands this test does not run: teach it the new step"


# --- The workshop's steps: the README's code is the files' code, each step keeps its promise ---
# The README quotes steps/*.py in its `python` blocks (first line: `# steps/FILE`); each block
# must be, line for line, in the file it names. Every function the README names must exist.
# Each step is started as a process, as the reader starts it, and checked for what it teaches.

STEPS = CHAT_PY.parent / "steps"
QUOTED = [
    CHAT_PY,
    *sorted(CHAT_PY.with_name("parts").glob("*.py")),
    *sorted(STEPS.glob("step*.py")),
]


def readme_python_blocks():
    """(file named on the first line, the lines after it) for each `python` block."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    for block in blocks:
        first, *lines = block.splitlines()
        assert re.fullmatch(r"# \S+\.py", first), f"a python block names no file: {first!r}"
        yield first[2:], lines


def test_readme_python_blocks_are_line_for_line_in_the_files_they_quote():
    blocks = list(readme_python_blocks())
    assert len(blocks) >= 3  # steps 1 and 2 whole, step 3's new parts
    for path, lines in blocks:
        file_lines = (CHAT_PY.parent / path).read_text(encoding="utf-8").splitlines()
        runs = (file_lines[i : i + len(lines)] for i in range(len(file_lines)))
        assert lines in runs, f"the README's block from {path} is not in {path}: {lines[:3]}"


def test_readme_quotes_steps_1_and_2_whole():
    quoted = {path: lines for path, lines in readme_python_blocks()}
    for step in ("steps/step1_echo.py", "steps/step2_room.py"):
        assert quoted[step] == (CHAT_PY.parent / step).read_text(encoding="utf-8").splitlines()


def defined_names():
    """Top-level names (functions, classes, constants, imports) of chat.py, parts/ and
    the steps, and `Class.attribute` for what their classes define."""
    names = set()
    for path in QUOTED:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
            elif isinstance(node, ast.Assign):
                names.update(target.id for target in node.targets if isinstance(target, ast.Name))
            if isinstance(node, ast.ClassDef):
                names.update(
                    f"{node.name}.{item.name}"
                    for item in node.body
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                )
    return names


def test_every_function_the_readme_names_exists():
    """`name()` and `Class.method()` anywhere in the README, and every name in the "where"
    column of step 4's table: ours must be defined, a library's must be in that library."""
    readme = README.read_text(encoding="utf-8")
    table = readme.split("### Step 4", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    where = [row.split(" | ")[1] for row in table.splitlines()[2:]]
    named = re.findall(r"`([A-Za-z_][\w.]*)\(\)`", readme)
    named += [name for cell in where for name in re.findall(r"`([A-Za-z_][\w.]*?)(?:\(\))?`", cell)]
    ours = defined_names()
    assert len(named) > 40
    missing = []
    for name in dict.fromkeys(named):
        module, _, rest = name.partition(".")
        if name in ours or name.endswith(".py"):
            continue
        # a library module's function, such as asyncio.run_coroutine_threadsafe()
        if module in ours and module[0].islower():
            with contextlib.suppress(ImportError, AttributeError):
                functools.reduce(getattr, rest.split("."), importlib.import_module(module))
                continue
        missing.append(name)
    assert missing == [], f"the README names what no file defines: {missing}"


class StepProcess(ChatProcess):
    """`python steps/STEP ARGS`; steps 1 and 2 print only the websocket URL."""

    def __init__(self, step, *args):
        self.script = STEPS / step
        super().__init__(*args)

    def ws_urls(self):
        """Steps 1 and 2: the one line they print."""
        websocket = self.lines.get(timeout=STARTING)
        self.ws_port = int(websocket.rsplit(":", 1)[1].strip("/\n"))
        return websocket

    def urls(self):
        """Step 3: the page's URL, then the websocket's."""
        page = self.lines.get(timeout=STARTING)
        self.port = int(page.rsplit(":", 1)[1].strip("/\n"))
        return page, self.ws_urls()

    def interrupt(self):
        """Ctrl+C: the step stops, with no traceback."""
        self.process.send_signal(signal.SIGINT)
        assert self.process.wait(10) == 0
        assert "Traceback" not in self.process.stderr.read()


@pytest.fixture
def step_process():
    started = []

    def start(step, *args):
        started.append(StepProcess(step, *args))
        return started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def step2(step_process):
    step = step_process("step2_room.py", "--ws-port", "0")
    step.ws_urls()
    return step


def test_step1_echoes_every_frame_and_prints_its_url(step_process):
    step = step_process("step1_echo.py", "--ws-port", "0")
    assert re.fullmatch(r"Websocket:  ws://127\.0\.0\.1:[1-9]\d*/\n", step.ws_urls())
    with connect(f"ws://127.0.0.1:{step.ws_port}/") as ws:
        for frame in ["hello", '{"type": "message"}', b"\x00\xff"]:
            ws.send(frame)
            assert ws.recv(timeout=5) == frame
    step.interrupt()


def step2_client(step, name):
    return connect(f"ws://127.0.0.1:{step.ws_port}/?name={name}")


def test_step2_sends_the_history_and_who_is_online_first(step2):
    with step2_client(step2, "alice") as alice:
        receive(alice, "history")
        alice.send("one")
        alice.send(json.dumps({"type": "message", "text": "two"}))
        receive_until(alice, lambda frames: len(frames) == 2)
        with step2_client(step2, "bob") as bob:
            history = json.loads(bob.recv(timeout=5))
            assert history["type"] == "history" and history["name"] == "bob"
            assert [m["text"] for m in history["messages"]] == ["one", "two"]
            assert [m["id"] for m in history["messages"]] == [1, 2]
            assert history["online"] == ["alice"]


def test_step2_sends_each_message_to_everyone_the_sender_too(step2):
    with step2_client(step2, "alice") as alice, step2_client(step2, "bob") as bob:
        for ws in (alice, bob):
            receive(ws, "history")
        receive(alice, "presence")  # bob's arrival, so alice's message comes after it for both
        alice.send(json.dumps({"type": "message", "text": "hi all"}))
        for ws in (alice, bob):
            message = receive(ws, "message")
            assert message | {"ts": "..."} == {
                "type": "message",
                "id": 1,
                "name": "alice",
                "text": "hi all",
                "ts": "...",
            }
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", message["ts"])


def test_step2_tells_everyone_who_joins_renames_and_leaves(step2):
    with step2_client(step2, "alice") as alice:
        receive(alice, "history")
        assert receive(alice, "presence")["joined"] == "alice"
        with step2_client(step2, "bob") as bob:
            receive(bob, "history")
            assert receive(alice, "presence")["changes"] == [{"joined": "bob"}]
            bob.send(json.dumps({"type": "name", "name": "robert"}))
            assert receive(alice, "presence")["renamed"] == {"from": "bob", "to": "robert"}
        assert receive(alice, "presence")["left"] == "robert"
        alice.send(json.dumps({"type": "dance"}))
        assert receive(alice, "error")["error"] == "unknown type"


def test_step2_chats_with_plain_text_from_the_interactive_client(step2, terminals):
    with step2_client(step2, "bob") as bob:
        receive(bob, "history")
        alice = terminals(f'python -m websockets "ws://127.0.0.1:{step2.ws_port}/?name=alice"')
        alice.expect_frame("history")
        alice.type("hello from the terminal")
        for frame in (alice.expect_frame("message"), receive(bob, "message")):
            assert (frame["name"], frame["text"]) == ("alice", "hello from the terminal")
        alice.close()


@pytest.fixture
def step3(step_process):
    step = step_process("step3_hug.py", "--port", "0", "--ws-port", "0")
    page, websocket = step.urls()
    assert re.fullmatch(r"Chat page:  http://127\.0\.0\.1:[1-9]\d*/\n", page)
    assert re.fullmatch(r"Websocket:  ws://127\.0\.0\.1:[1-9]\d*/\n", websocket)
    return step


def test_step3_posts_over_http_reach_websockets_and_get_messages(step3):
    with connect(f"ws://127.0.0.1:{step3.ws_port}/?name=bob") as bob:
        receive(bob, "history")
        status, stored = post(
            step3.port, "/messages", {"name": "curl", "text": "over HTTP", "ref": "r1"}
        )
        assert status == 201
        assert stored | {"ts": "..."} == {
            "type": "message",
            "id": 1,
            "name": "curl",
            "text": "over HTTP",
            "ref": "r1",
            "ts": "...",
        }
        assert receive(bob, "message") == stored
        bob.send(json.dumps({"type": "message", "text": "over the websocket"}))
        receive(bob, "message")
    status, body = get(step3.port, "/messages?since=1&limit=5")
    assert status == 200 and [m["text"] for m in body["messages"]] == ["over the websocket"]
    assert post(step3.port, "/messages", {"name": "curl"})[0] == 400  # no text


@pytest.mark.timeout(90)
def test_step3_with_its_port_in_use_says_so_and_exits():
    """A learner who left step 2 running gets the error and the prompt back, not a hung step."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        step = subprocess.Popen(
            [sys.executable, STEPS / "step3_hug.py", "--port", "0"]
            + ["--ws-port", str(taken.getsockname()[1])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _, errors = step.communicate(timeout=STARTING)
        except subprocess.TimeoutExpired:  # hung: the loop's thread kept the process alive
            step.kill()
            step.communicate()
            raise
    assert step.returncode != 0
    assert "address already in use" in errors


def test_step3_serves_the_page_and_tells_it_the_websocket_port(step3):
    status, content_type, html = request(step3.port, "GET", "/")
    assert status == 200 and content_type == "text/html; charset=utf-8"
    assert html.decode() == CHAT_PY.with_name("chat.html").read_text(encoding="utf-8")
    assert get(step3.port, "/config")[1]["ws_port"] == step3.ws_port
    step3.interrupt()


def record_websockets(context):
    """The websockets the context's pages open, in `context.websockets`."""
    context.websockets = []
    context.on("page", lambda page: page.on("websocket", lambda ws: context.websockets.append(ws)))


def is_pong(frame):
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(frame).get("type") == "pong"
    return False


def test_browser_two_pages_chat_through_step3_and_stay_online_past_the_heartbeat(step3, open_page):
    from playwright.sync_api import expect

    alice, bob = (
        open_page(step3.port, name, clock=True, prepare=record_websockets)
        for name in ("alice", "bob")
    )
    expect(alice.locator("#online")).to_contain_text("bob")
    say(alice, "hello bob")
    say(bob, "hello alice")
    for page in (alice, bob):
        expect(texts(page)).to_have_text(["hello bob", "hello alice"])
        expect(page.locator("#outbox .message")).to_have_count(0)  # each came back by its ref
        record_statuses(page)
    for _ in range(3):  # three heartbeats: two unanswered ones in a row would drop the connection
        for page in (alice, bob):
            websocket = page.context.websockets[-1]
            with websocket.expect_event("framereceived", predicate=is_pong, timeout=10_000):
                page.clock.run_for(10_000)
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_text("online")
        assert page.evaluate("statuses") == []
