"""The workshop: every step and every exercise's solution, started as a process as an attendee
starts it, keeps its promise; a port in use is one line and exit 2; steps/check.py says what is
not ready; docs/workshop.md's code is the files' code, and its commands run as written."""

import ast
import contextlib
import difflib
import functools
import http.client
import importlib
import itertools
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
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.helpers import (
    ROOT,
    ChatProcess,
    get,
    post,
    qr_lines,
    receive,
    request,
    say,
    shows_qr_code_of,
    texts,
)

STEPS = ROOT / "steps"
WORKSHOP = ROOT / "docs" / "workshop.md"
STARTING = 60  # seconds a process may take to print its first line, on a loaded machine


def as_in_a_terminal():
    """For preexec_fn: SIGINT at its default, as a terminal's shell starts a program in the
    foreground. Without it the step inherits pytest's disposition, and pytest started in the
    background by a script (`pytest &`, no job control) ignores SIGINT: then a step that leaves
    SIGINT to Python (asyncio.run(), waitress) ignores Ctrl+C too, and never stops."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class StepProcess(ChatProcess):
    """`python steps/STEP ARGS`; steps 1 to 3 print only the websocket URL."""

    def __init__(self, step, *args):
        self.script = STEPS / step
        super().__init__(*args, preexec_fn=as_in_a_terminal)

    def ws_urls(self):
        websocket = self.lines.get(timeout=STARTING)
        self.ws_port = int(websocket.rsplit(":", 1)[1].strip("/\n"))
        return websocket

    def urls(self):
        """Steps 4 and 5: the page's URL, then the websocket's."""
        page = self.lines.get(timeout=STARTING)
        self.port = int(page.rsplit(":", 1)[1].strip("/\n"))
        return page, self.ws_urls()

    def client(self, path="/", **query):
        query = f"?{urllib.parse.urlencode(query)}" if query else ""
        return connect(f"ws://127.0.0.1:{self.ws_port}{path}{query}", open_timeout=10)

    def interrupt(self):
        """Ctrl+C: the step stops, exit status 0, with no traceback."""
        self.process.send_signal(signal.SIGINT)
        assert self.process.wait(10) == 0
        assert "Traceback" not in self.process.stderr.read()


@pytest.fixture
def step_process():
    started = []

    def start(step, *args):
        started.append(StepProcess(step, *args))
        process = started[-1]
        if step.startswith(("step4", "step5")):
            process.urls()
        else:
            process.ws_urls()
        return process

    yield start
    for process in started:
        process.stop()


def frames(ws, kind, count=1):
    return [receive(ws, kind) for _ in range(count)]


def no_frame_within(ws, seconds=0.5):
    with pytest.raises(TimeoutError):
        ws.recv(timeout=seconds)


# --- Step 1: an echo; its exercise: the server speaks first, and counts ----------------------


def test_step1_echoes_every_frame_and_prints_its_url(step_process):
    step = step_process("step1_echo.py", "--ws-port", "0")
    with step.client() as ws:
        for frame in ["hello", '{"type": "message"}', b"\x00\xff"]:
            ws.send(frame)
            assert ws.recv(timeout=5) == frame
    step.interrupt()


def test_step1_solution_welcomes_each_client_and_counts_its_frames(step_process):
    step = step_process("step1_count_solution.py", "--ws-port", "0")
    with step.client() as first, step.client() as second:
        assert first.recv(timeout=5) == "welcome, client 1"
        assert second.recv(timeout=5) == "welcome, client 2"
        for ws in (first, second, first):
            ws.send("hi")
        assert [first.recv(timeout=5), first.recv(timeout=5)] == ["1: hi", "2: hi"]
        assert second.recv(timeout=5) == "1: hi"
    step.interrupt()


# --- Step 2: everyone gets every message; its exercise: rooms by path ------------------------


def test_step2_sends_every_frame_to_everyone_the_sender_too(step_process):
    step = step_process("step2_broadcast.py", "--ws-port", "0")
    with step.client() as alice, step.client() as bob:
        alice.send("hello")  # bob is in: his handshake is done
        assert [alice.recv(timeout=5), bob.recv(timeout=5)] == ["hello", "hello"]
        bob.close()
        alice.send("still here")  # bob's leaving did not break the room
        assert alice.recv(timeout=5) == "still here"
    step.interrupt()


def test_step2_solution_keeps_rooms_by_path_apart(step_process):
    step = step_process("step2_rooms_solution.py", "--ws-port", "0")
    with (
        step.client("/kitchen") as cook,
        step.client("/kitchen") as waiter,
        step.client("/garden") as gardener,
    ):
        cook.send("soup is ready")
        assert waiter.recv(timeout=5) == cook.recv(timeout=5) == "soup is ready"
        no_frame_within(gardener)
        gardener.send("roses")
        assert gardener.recv(timeout=5) == "roses"
        no_frame_within(cook)


# --- Step 3: the room; its exercise: who is typing --------------------------------------------


def test_step3_sends_the_history_and_who_is_online_first(step_process):
    step = step_process("step3_room.py", "--ws-port", "0")
    with step.client(name="alice") as alice:
        receive(alice, "history")
        alice.send("one")
        alice.send(json.dumps({"type": "message", "text": "two"}))
        frames(alice, "message", 2)
        with step.client(name="bob") as bob:
            history = json.loads(bob.recv(timeout=5))
            assert history["type"] == "history" and history["name"] == "bob"
            assert [(m["id"], m["text"]) for m in history["messages"]] == [(1, "one"), (2, "two")]
            assert history["online"] == ["alice"]


def test_step3_sends_each_message_to_everyone_with_its_id_time_and_name(step_process):
    step = step_process("step3_room.py", "--ws-port", "0")
    with step.client(name="alice") as alice, step.client(name="bob") as bob:
        for ws in (alice, bob):
            receive(ws, "history")
        receive(alice, "presence")  # bob's arrival
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


def test_step3_tells_everyone_who_joins_renames_and_leaves(step_process):
    step = step_process("step3_room.py", "--ws-port", "0")
    with step.client(name="alice") as alice:
        receive(alice, "history")
        assert receive(alice, "presence")["joined"] == "alice"
        with step.client(name="bob") as bob:
            receive(bob, "history")
            assert receive(alice, "presence")["changes"] == [{"joined": "bob"}]
            bob.send(json.dumps({"type": "name", "name": "robert"}))
            assert receive(alice, "presence")["renamed"] == {"from": "bob", "to": "robert"}
        assert receive(alice, "presence")["left"] == "robert"
        alice.send(json.dumps({"type": "dance"}))
        assert receive(alice, "error")["error"] == "unknown type"


def test_step3_solution_tells_the_others_who_is_typing(step_process):
    step = step_process("step3_typing_solution.py", "--ws-port", "0")
    with step.client(name="alice") as alice, step.client(name="bob") as bob:
        for ws in (alice, bob):
            receive(ws, "history")
        alice.send(json.dumps({"type": "typing"}))
        assert receive(bob, "typing") == {"type": "typing", "name": "alice"}
        alice.send("done typing")  # alice's next frame is her message: no typing frame before it
        assert json.loads(alice.recv(timeout=5))["type"] == "presence"  # bob's arrival
        assert receive_next_of(alice, ("typing", "message"))["type"] == "message"


def receive_next_of(ws, kinds):
    while True:
        frame = json.loads(ws.recv(timeout=5))
        if frame["type"] in kinds:
            return frame


# --- Step 4: beside hug; its exercise: GET /online --------------------------------------------


def test_step4_posts_over_http_reach_websockets(step_process):
    step = step_process("step4_hug.py", "--port", "0", "--ws-port", "0")
    with step.client(name="bob") as bob:
        receive(bob, "history")
        status, stored = post(step.port, "/messages", {"name": "curl", "text": "over HTTP"})
        assert status == 201 and stored["id"] == 1 and stored["name"] == "curl"
        assert receive(bob, "message") == stored
        bob.send(json.dumps({"type": "message", "text": "over the websocket", "ref": "r1"}))
        assert receive(bob, "message")["ref"] == "r1"  # how the page knows its message came back
        bob.send(json.dumps({"type": "ping"}))
        receive(bob, "pong")
    assert post(step.port, "/messages", {"name": "curl"})[0] == 400  # no text


def test_step4_serves_the_page_and_tells_it_the_websocket_port(step_process):
    step = step_process("step4_hug.py", "--port", "0", "--ws-port", "0")
    status, content_type, html = request(step.port, "GET", "/")
    assert status == 200 and content_type == "text/html; charset=utf-8"
    assert html.decode() == (ROOT / "chat.html").read_text(encoding="utf-8")
    assert get(step.port, "/config")[1]["ws_port"] == step.ws_port
    step.interrupt()


def test_step4_solution_answers_who_is_online(step_process):
    step = step_process("step4_online_solution.py", "--port", "0", "--ws-port", "0")
    assert get(step.port, "/online") == (200, {"online": []})
    with step.client(name="bob") as bob, step.client(name="alice") as alice:
        for ws in (bob, alice):
            receive(ws, "history")
        assert get(step.port, "/online") == (200, {"online": ["alice", "bob"]})


# --- Step 5: reconnects and restarts; its exercise: a private message --------------------------


def test_step5_a_client_that_comes_back_gets_only_what_it_missed(step_process):
    step = step_process("step5_restarts.py", "--port", "0", "--ws-port", "0")
    room = get(step.port, "/config")[1]["room"]
    with step.client(name="alice") as alice:
        receive(alice, "history")
        for text in ["one", "two", "three"]:
            alice.send(text)
            receive(alice, "message")
        with step.client(name="bob", since=2, room=room) as bob:
            history = receive(bob, "history")
            assert history["room"] == room
            assert [m["text"] for m in history["messages"]] == ["three"]
        with step.client(name="bob", since=2, room="a room before a restart") as bob:
            assert len(receive(bob, "history")["messages"]) == 3  # ids began again: all of it
    status, body = get(step.port, "/messages?since=1&limit=1")
    assert status == 200 and [m["text"] for m in body["messages"]] == ["two"]


def test_step5_a_message_sent_again_with_its_ref_is_kept_once(step_process):
    step = step_process("step5_restarts.py", "--port", "0", "--ws-port", "0")
    with step.client(name="alice") as alice, step.client(name="bob") as bob:
        for ws in (alice, bob):
            receive(ws, "history")
        for _ in range(2):  # the second time, as after a reconnect
            alice.send(json.dumps({"type": "message", "text": "once", "ref": "k3j9x"}))
            assert receive(alice, "message")["id"] == 1
        alice.send("after")
        assert [receive(bob, "message")["text"] for _ in range(2)] == ["once", "after"]
    assert [m["text"] for m in get(step.port, "/messages")[1]["messages"]] == ["once", "after"]


def test_step5_solution_sends_a_private_message_to_one_name_only(step_process):
    step = step_process("step5_private_solution.py", "--port", "0", "--ws-port", "0")
    with (
        step.client(name="alice") as alice,
        step.client(name="bob") as bob,
        step.client(name="carol") as carol,
    ):
        for ws in (alice, bob, carol):
            receive(ws, "history")
        alice.send(json.dumps({"type": "private", "to": "bob", "text": "psst"}))
        private = {"type": "private", "from": "alice", "to": "bob", "text": "psst"}
        assert receive(bob, "private") == receive(alice, "private") == private
        alice.send(json.dumps({"type": "private", "to": "dave", "text": "hello?"}))
        assert receive(alice, "error")["error"] == "nobody here is called dave"
        alice.send("for everyone")
        assert receive_next_of(carol, ("private", "message"))["text"] == "for everyone"
    assert [m["text"] for m in get(step.port, "/messages")[1]["messages"]] == ["for everyone"]


def test_browser_two_pages_go_on_through_a_restart_of_step5(step_process, open_page):
    """Restarted on the same ports, the step is a new room: both pages say so, and show every
    message posted afterwards, from either of them."""
    from playwright.sync_api import expect

    step = step_process("step5_restarts.py", "--port", "0", "--ws-port", "0")
    alice, bob = (open_page(step.port, name) for name in ("alice", "bob"))
    say(alice, "before the restart")
    for page in (alice, bob):
        expect(texts(page)).to_have_text(["before the restart"])
    step.interrupt()
    again = step_process(
        "step5_restarts.py", "--port", str(step.port), "--ws-port", str(step.ws_port)
    )
    assert (again.port, again.ws_port) == (step.port, step.ws_port)
    for page in (alice, bob):
        expect(page.locator("#chat-box .notice", has_text="restarted")).to_have_count(1)
        expect(page.locator("#status")).to_have_text("online")
    say(alice, "from alice")
    say(bob, "from bob")
    for page in (alice, bob):
        expect(texts(page)).to_have_text(["before the restart", "from alice", "from bob"])
        expect(page.locator("#outbox .message")).to_have_count(0)


# --- Every step: a port in use is one line and exit 2 ------------------------------------------

STEP_FILES = sorted(path.name for path in STEPS.glob("step*.py"))


@pytest.mark.parametrize("step", STEP_FILES)
def test_a_port_in_use_is_one_line_and_exit_2(step):
    """An attendee who left the last step running gets one line and the prompt back."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = ["--ws-port", str(taken.getsockname()[1])]
        if step.startswith(("step4", "step5")):
            args += ["--port", "0"]
        try:
            done = subprocess.run(
                [sys.executable, STEPS / step, *args],
                capture_output=True,
                check=False,
                text=True,
                timeout=STARTING,
            )
        except subprocess.TimeoutExpired:  # hung: a thread kept the process alive
            pytest.fail(f"{step} did not exit with its port in use")
    assert done.returncode == 2
    assert re.fullmatch(
        rf"{step}: error: cannot listen on port .*address already in use\n", done.stderr
    )


# --- Step 0: steps/check.py ---------------------------------------------------------------------


def test_check_says_in_one_line_each_that_a_port_is_in_use_and_a_package_is_missing(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "websockets>=17,<18   # here\n"
        "no-such-package-for-the-workshop>=1\n"
        'setuptools; python_version<"3.0"   # a marker that excludes it\n'
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run(
            [sys.executable, STEPS / "check.py", "--requirements", requirements]
            + ["--port", str(taken.getsockname()[1]), "--ws-port", "0"],
            capture_output=True,
            check=False,
            text=True,
            timeout=STARTING,
        )
        port = taken.getsockname()[1]
    lines = done.stdout.splitlines()
    assert done.returncode == 1
    assert [line for line in lines if line.startswith("FIX ") and "port" in line] == [
        (
            f"FIX  port {port} (HTTP) is in use: stop what runs there (a step or "
            "chat.py in another terminal? Ctrl+C there), or give the steps other ports"
        )
    ]
    missing = [line for line in lines if "no-such-package" in line]
    assert missing == [
        (
            "FIX  no-such-package-for-the-workshop is not installed: "
            "python -m pip install -r requirements.txt"
        )
    ]
    assert any(re.fullmatch(r"ok   websockets 17\.\d+(\.\d+)?", line) for line in lines)
    assert not any("setuptools" in line for line in lines)  # its marker says: not here
    assert lines[-1].startswith("Not ready yet")


def test_check_is_ready_in_a_venv_with_the_requirements(tmp_path):
    """The tests' own venv, which has the requirements, as an attendee's has after the install;
    run outside one, a venv that sees this Python's packages. An attendee's venv has no NumPy,
    which breaks hug (check.py says so): here it is hidden."""
    if sys.prefix != sys.base_prefix:  # in a venv: a venv made from it would not see its packages
        venv = Path(sys.prefix)
    else:
        venv = tmp_path / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    (tmp_path / "numpy.py").write_text('raise ImportError("not in an attendee\'s venv")\n')
    done = subprocess.run(
        [venv / "bin" / "python", STEPS / "check.py", "--port", "0", "--ws-port", "0"],
        capture_output=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        text=True,
        timeout=STARTING,
    )
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines()[-1] == "Ready."
    assert f"ok   virtual environment active: {venv}" in done.stdout.splitlines()


# --- docs/workshop.md: its code is the files' code, and what it names exists ----------------------


def workshop_python_blocks():
    """(file named on the first line, the lines after it) for each `python` block."""
    blocks = re.findall(r"```python\n(.*?)```", WORKSHOP.read_text(encoding="utf-8"), re.DOTALL)
    for block in blocks:
        first, *lines = block.splitlines()
        assert re.fullmatch(r"# steps/\S+\.py", first), f"a python block names no file: {first!r}"
        yield first[2:], lines


def test_workshop_python_blocks_are_line_for_line_in_the_files_they_quote():
    blocks = list(workshop_python_blocks())
    quoted = {path for path, _ in blocks}
    assert quoted == {f"steps/{name}" for name in STEP_FILES}  # every step and every solution
    for path, lines in blocks:
        file_lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
        runs = (file_lines[i : i + len(lines)] for i in range(len(file_lines)))
        assert lines in runs, f"the workshop's block from {path} is not in {path}: {lines[:3]}"


def test_workshop_shows_steps_1_and_2_whole():
    quoted = dict(workshop_python_blocks())
    for step in ("steps/step1_echo.py", "steps/step2_broadcast.py"):
        assert quoted[step] == (ROOT / step).read_text(encoding="utf-8").splitlines()


def test_workshop_shows_every_new_line_of_each_solution():
    """What an attendee types for an exercise is all on the page, beside the exercise."""
    shown = {}
    for path, lines in workshop_python_blocks():
        shown.setdefault(path, []).extend(lines)
    for solution in STEPS.glob("step*_solution.py"):
        step = next(STEPS.glob(solution.name[:6] + "*[!n].py"))  # step3_typing_... -> step3_room
        before = step.read_text(encoding="utf-8").splitlines()
        after = solution.read_text(encoding="utf-8").splitlines()
        docstring_end = after.index("", 1)  # the module docstring says which exercise it solves
        new = [line for line in after[docstring_end:] if line.strip() and line not in before]
        missing = [line for line in new if line not in shown[f"steps/{solution.name}"]]
        assert new and missing == [], f"docs/workshop.md does not show {solution.name}'s {missing}"


def defined_names():
    """Top-level names (functions, classes, assignments, imports) of chat.py, the modules beside
    it and the steps, and `Class.method` for what their classes define."""
    names = set()
    for path in [*ROOT.glob("*.py"), *ROOT.glob("parts/*.py"), *STEPS.glob("*.py")]:
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


def test_every_function_the_workshop_names_exists():
    """`name()` and `Class.method()` anywhere in the workshop, and every name in the "where"
    column of chat.py's table: ours must be defined, a library's must be in that library."""
    text = WORKSHOP.read_text(encoding="utf-8")
    table = text.split("## Step 6", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    where = [row.split(" | ")[1] for row in table.splitlines()[2:]]
    named = re.findall(r"`([A-Za-z_][\w.]*)\(\)`", text)
    named += [name for cell in where for name in re.findall(r"`([A-Za-z_][\w.]*?)(?:\(\))?`", cell)]
    ours = defined_names()
    assert len(named) > 30
    missing = []
    for name in dict.fromkeys(named):
        module, _, rest = name.partition(".")
        if name in ours or name.endswith(".py"):
            continue
        if module in ours and module[0].islower():  # asyncio.run_coroutine_threadsafe()
            with contextlib.suppress(ImportError, AttributeError):
                functools.reduce(getattr, rest.split("."), importlib.import_module(module))
                continue
        missing.append(name)
    assert missing == [], f"the workshop names what no file defines: {missing}"


def test_each_step_adds_about_60_lines_at_most_to_the_one_before():
    steps = sorted(STEPS.glob("step?_*.py"))
    steps = [path for path in steps if not path.stem.endswith("_solution")]
    assert [path.name[:5] for path in steps] == ["step1", "step2", "step3", "step4", "step5"]
    # the lines of code (not blank) a diff from the step before adds, changed lines included
    for before, after in itertools.pairwise(steps):
        old, new = (path.read_text(encoding="utf-8").splitlines() for path in (before, after))
        diff = itertools.islice(difflib.unified_diff(old, new, n=0, lineterm=""), 2, None)
        added = len([line for line in diff if line.startswith("+") and line[1:].strip()])
        assert added <= 60, f"{after.name} adds {added} lines of code to {before.name}"


# --- The walkthrough, run as docs/workshop.md writes it ----------------------------------------
# Every shell command of the workshop (and of the README's workshop room) runs as written: real
# curl, the real `python -m websockets` client fed through its stdin, servers on free ports. What
# the text says you will see is checked. A command the test does not know, or one it looks for
# and cannot find, fails the test: a step of the walkthrough cannot break silently.

ESCAPES = re.compile(r"\x1b(\[[0-9;]*[A-Za-z]|[78])")  # the interactive client's cursor moves
COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # the QR code's black on white, as a reader sees it


class Walkthrough:
    """The walkthrough's shell commands (PowerShell's too, with curl.exe as curl), in order, and
    its example output blocks."""

    def __init__(self):
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        room = readme.split("## A workshop room", 1)[1].split("\n## ", 1)[0]
        text = WORKSHOP.read_text(encoding="utf-8") + room
        blocks = re.findall(r"```(\w*)\n(.*?)```", text, flags=re.DOTALL)
        self.commands = [
            line.replace("curl.exe ", "curl ")
            for kind, body in blocks
            if kind in ("sh", "powershell")
            for line in body.replace("\\\n", "").splitlines()
            if line.strip()
        ]
        self.outputs = [body for kind, body in blocks if kind == ""]
        self.port, self.ws_port = 8000, 8765
        self.unused = list(self.commands)

    def take(self, pattern):
        """The next command not run yet that matches `pattern` (a regex, matched whole)."""
        found = [c for c in self.unused if re.fullmatch(pattern, " ".join(c.split()))]
        assert found, (
            f"the walkthrough has no {pattern!r} left: update docs/workshop.md or this test"
        )
        self.unused.remove(found[0])
        return self.swap_ports(found[0])

    def again(self, pattern):
        """A command run before, that the text says to run again ("as in step 3")."""
        done = [c for c in self.commands if c not in self.unused]
        found = [c for c in done if re.fullmatch(pattern, " ".join(c.split()))]
        assert found, f"the walkthrough ran no {pattern!r} before"
        return self.swap_ports(found[0])

    def start(self, terminals, pattern, http=False):
        """A step or chat.py, started by its command on free ports; its URLs stand for the
        walkthrough's ports from now on."""
        server = terminals(self.take(pattern) + (" --port 0" if http else "") + " --ws-port 0")
        printed = [server.expect("Chat page:")] if http else []
        printed.append(server.expect("Websocket:"))
        ports = [int(line.rsplit(":", 1)[1].strip("/")) for line in printed]
        self.port, self.ws_port = ports if http else (self.port, *ports)
        server.printed = printed
        return server

    def output(self, first):
        found = [body for body in self.outputs if body.startswith(first)]
        assert len(found) == 1, f"the walkthrough has {len(found)} outputs like {first!r}"
        return self.swap_ports(found[0])

    def swap_ports(self, text):
        return text.replace(":8000", f":{self.port}").replace(":8765", f":{self.ws_port}")


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
            cwd=ROOT,
            preexec_fn=as_in_a_terminal,  # noqa: PLW1509 (it only resets a signal)
        )
        self.heard = False
        self.lines, self.errors = queue.Queue(), []
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
            return frame["type"] == kind and all(frame.get(k) == v for k, v in fields.items())

        return json.loads(self.expect(matches)[2:])

    def output(self, timeout=10):
        """Everything it printed, once it has finished."""
        self.process.wait(timeout)
        self.readers[0].join(timeout)
        return "\n".join(self.lines.queue)

    def ctrl_c(self):
        """Ctrl+C, as a reader stops a server before the next one: exit status 0."""
        self.process.send_signal(signal.SIGINT)
        assert self.process.wait(10) == 0

    def close(self):
        """Ctrl+D; then make sure it is gone."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for reader in self.readers:
            reader.join(5)
        for pipe in (self.process.stdout, self.process.stderr, self.process.stdin):
            pipe.close()


@pytest.fixture
def terminals():
    opened = []

    def open_terminal(command):
        opened.append(Terminal(command))
        return opened[-1]

    yield open_terminal
    for terminal in opened:
        if terminal.process.poll() is None:
            terminal.process.send_signal(signal.SIGINT)
        terminal.close()
        assert "Traceback" not in "".join(terminal.errors)


def client(steps, terminals, pattern):
    """An interactive websocket client, by its command; it says when it is connected."""
    terminal = terminals(steps.take(pattern))
    terminal.expect("Connected to")
    return terminal


@pytest.mark.timeout(300)  # some twenty processes, each started as the reader starts it
def test_the_workshop_walkthrough_works_as_written(terminals):
    if shutil.which("curl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the walkthrough test must run under CI: apt-get install curl")
        pytest.skip("no curl on this machine: apt-get install curl")
    steps = Walkthrough()
    ws = r"python -m websockets "

    # Step 0: one line per item, each ok or FIX, and the verdict last.
    checked = terminals(steps.take(r"python steps/check\.py")).output(STARTING).splitlines()
    assert all(line.startswith(("ok   ", "FIX  ")) for line in checked[:-1])
    assert checked[-1] in (
        "Ready.",
        "Not ready yet: fix the lines marked FIX, then run this again.",
    )

    # Step 1: the echo prints its URL; what you type comes back. Its solution greets and counts.
    step = steps.start(terminals, r"python steps/step1_echo\.py")
    assert step.printed == [steps.swap_ports("Websocket:  ws://127.0.0.1:8765/")]
    echo = client(steps, terminals, ws + r"ws://127\.0\.0\.1:8765/")
    echo.type("hello")
    echo.expect("< hello")
    echo.close()
    step.ctrl_c()
    step = steps.start(terminals, r"python steps/step1_count_solution\.py")
    with connect(f"ws://127.0.0.1:{steps.ws_port}/") as first:
        assert first.recv(timeout=5) == "welcome, client 1"
        first.send("hello")
        assert first.recv(timeout=5) == "1: hello"
    step.ctrl_c()

    # Step 2: what one client types, both receive. Its solution: rooms by path.
    step = steps.start(terminals, r"python steps/step2_broadcast\.py")
    one = client(steps, terminals, ws + r"ws://127\.0\.0\.1:8765/")
    with connect(f"ws://127.0.0.1:{steps.ws_port}/") as other:
        one.type("hello everyone")
        one.expect("< hello everyone")
        assert other.recv(timeout=5) == "hello everyone"
    one.close()
    step.ctrl_c()
    step = steps.start(terminals, r"python steps/step2_rooms_solution\.py")
    kitchen = client(steps, terminals, ws + r"ws://127\.0\.0\.1:8765/kitchen")
    garden = client(steps, terminals, ws + r"ws://127\.0\.0\.1:8765/garden")
    with connect(f"ws://127.0.0.1:{steps.ws_port}/kitchen") as cook:
        garden.type("roses")
        garden.expect("< roses")
        kitchen.type("soup")
        kitchen.expect("< soup")
        assert cook.recv(timeout=5) == "soup"  # and not the roses
    for terminal in (kitchen, garden):
        terminal.close()
    step.ctrl_c()

    # Step 3: alice and bob each get history first; "hello" from alice reaches both, with id 1.
    step = steps.start(terminals, r"python steps/step3_room\.py")
    alice_command = ws + r'"ws://127\.0\.0\.1:8765/\?name=alice"'
    bob_command = ws + r'"ws://127\.0\.0\.1:8765/\?name=bob"'
    alice, bob = (client(steps, terminals, command) for command in (alice_command, bob_command))
    for person in (alice, bob):
        person.expect_frame("history")
    alice.type("hello")
    for person in (alice, bob):
        message = person.expect_frame("message", text="hello")
        assert (message["id"], message["name"]) == (1, "alice")
    for frame in steps.output('{"type": "message"').splitlines():  # the JSON frames shown
        alice.type(frame)
    assert bob.expect_frame("message", text="hi")["name"] == "alice"
    bob.expect(lambda line: line.startswith("< {") and '"to": "alice2"' in line)
    for person in (alice, bob):
        person.close()
    step.ctrl_c()
    step = steps.start(terminals, r"python steps/step3_typing_solution\.py")
    with connect(f"ws://127.0.0.1:{steps.ws_port}/?name=alice") as typist:
        receive(typist, "history")
        with connect(f"ws://127.0.0.1:{steps.ws_port}/?name=bob") as reader:
            receive(reader, "history")
            typist.send('{"type": "typing"}')
            assert receive(reader, "typing") == {"type": "typing", "name": "alice"}
    step.ctrl_c()

    # Step 4: curl posts (a form); a websocket client sees it.
    step = steps.start(terminals, r"python steps/step4_hug\.py", http=True)
    with connect(f"ws://127.0.0.1:{steps.ws_port}/?name=watcher") as watcher:
        receive(watcher, "history")
        posted = terminals(steps.take(r"curl -X POST http://127\.0\.0\.1:8000/messages .*"))
        assert json.loads(posted.output())["text"] == "hello from HTTP"
        assert receive(watcher, "message")["name"] == "curl"
        # Windows' curl.exe line: the same command, run here with curl
        posted = terminals(steps.take(r"curl -X POST http://127\.0\.0\.1:8000/messages .*"))
        assert json.loads(posted.output())["id"] == 2
        assert receive(watcher, "message")["text"] == "hello from HTTP"
    step.ctrl_c()
    step = steps.start(terminals, r"python steps/step4_online_solution\.py", http=True)
    with connect(f"ws://127.0.0.1:{steps.ws_port}/?name=alice") as present:
        receive(present, "history")
        online = terminals(steps.take(r"curl http://127\.0\.0\.1:8000/online"))
        assert json.loads(online.output()) == {"online": ["alice"]}
    step.ctrl_c()

    # Step 5: one, two; bob leaves; three; bob back with since=2 gets only three, and so does curl.
    step = steps.start(terminals, r"python steps/step5_restarts\.py", http=True)
    alice, bob = (client(steps, terminals, command) for command in (alice_command, bob_command))
    for person in (alice, bob):
        person.expect_frame("history")
    for text in ["one", "two"]:
        alice.type(text)
        bob.expect_frame("message", text=text)
    bob.close()
    alice.type("three")
    alice.expect_frame("message", text="three")
    bob = client(steps, terminals, ws + r'"ws://127\.0\.0\.1:8765/\?name=bob&since=2"')
    assert [m["text"] for m in bob.expect_frame("history")["messages"]] == ["three"]
    listed = terminals(steps.take(r'curl "http://127\.0\.0\.1:8000/messages\?since=2"'))
    assert [m["text"] for m in json.loads(listed.output())["messages"]] == ["three"]
    for person in (alice, bob):
        person.close()
    step.ctrl_c()
    step = steps.start(terminals, r"python steps/step5_private_solution\.py", http=True)
    carol = client(steps, terminals, ws + r'"ws://127\.0\.0\.1:8765/\?name=carol"')
    carol.expect_frame("history")
    with connect(f"ws://127.0.0.1:{steps.ws_port}/?name=alice") as sender:
        receive(sender, "history")
        sender.send('{"type": "private", "to": "carol", "text": "psst"}')
        assert carol.expect_frame("private")["from"] == "alice"
    carol.close()
    step.ctrl_c()

    # Step 6: chat.py prints the URLs shown (here on free ports); step 1 lives on at /echo.
    server = steps.start(terminals, r"python chat\.py", http=True)
    printed = [*server.printed, server.expect("Invitation:")]
    assert printed == steps.output("Chat page:  http://127.0.0.1:8000/").splitlines()
    echo = client(steps, terminals, ws + r"ws://127\.0\.0\.1:8765/echo")
    echo.type("hello")
    echo.expect("< hello")
    echo.close()
    # As in step 3: first; bob leaves; more; bob back with the last id he saw, 1.
    alice, bob = (terminals(steps.again(command)) for command in (alice_command, bob_command))
    for person in (alice, bob):
        person.expect_frame("history")
    alice.type("first")
    bob.expect_frame("message", text="first")
    bob.close()
    for text in ["while bob was away", "and more"]:
        alice.type(text)
        alice.expect_frame("message", text=text)
    bob = client(steps, terminals, ws + r'"ws://127\.0\.0\.1:8765/\?name=bob&since=1"')
    history = bob.expect_frame("history")
    assert [m["text"] for m in history["messages"]] == ["while bob was away", "and more"]
    health = terminals(steps.take(r"curl http://127\.0\.0\.1:8000/health"))
    assert json.loads(health.output())["clients"] == 2  # alice and bob
    bad = terminals(steps.take(r"curl -X POST http://127\.0\.0\.1:8000/messages .*\{oops'"))
    assert "not valid JSON" in json.loads(bad.output())["errors"]["body"]
    alice.type("")
    assert alice.expect_frame("error")["error"] == "text is empty"
    another = terminals(steps.take(r"python chat\.py --port 0 --ws-port 0"))
    assert re.fullmatch(r"Chat page:  http://127\.0\.0\.1:[1-9]\d*/", another.expect("Chat page:"))
    another.process.send_signal(signal.SIGINT)
    another.expect("Stopped.")
    assert another.process.wait(5) == 0

    # The README's workshop room: every printed address opens (never 0.0.0.0), loopback last.
    room = terminals(steps.take(r"python chat\.py --host 0\.0\.0\.0") + " --port 0 --ws-port 0")
    printed = [room.expect("Chat page:"), room.expect("Websocket:")]
    while "//127.0.0.1:" not in printed[-2]:
        printed += [room.expect("Chat page:"), room.expect("Websocket:")]
    links = [urllib.parse.urlsplit(line.split()[-1]) for line in printed[-2:]]
    steps.port, steps.ws_port = (link.port for link in links)
    key = links[0].query
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
            assert response.status == status
        connection.close()

    assert steps.unused == [], "walkthrough commands this test does not run: teach it the new step"
