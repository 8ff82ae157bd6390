"""The workshop: every step and every exercise's solution, started as a process as an attendee
starts it, keeps its promise; a port in use is one line and exit 2; steps/check.py says what is
not ready; docs/workshop.md's code is the files' code, and its commands run as written."""

import ast
import contextlib
import functools
import importlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from websockets.sync.client import connect

from test_chat import ChatProcess, browser, get, open_page, post, receive, request, say, texts  # noqa: F401

ROOT = Path(__file__).parent.parent
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


def test_step4_posts_over_http_reach_websockets_and_get_messages(step_process):
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
    status, body = get(step.port, "/messages?since=1&limit=5")
    assert status == 200 and [m["text"] for m in body["messages"]] == ["over the websocket"]
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


def test_browser_two_pages_go_on_through_a_restart_of_step5(step_process, open_page):  # noqa: F811
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
    """A venv that sees this Python's packages, as an attendee's after the install. An
    attendee's venv has no NumPy, which breaks hug (check.py says so): here it is hidden."""
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
    for before, after in itertools.pairwise(steps):
        old = before.read_text(encoding="utf-8").splitlines()
        new = [line for line in after.read_text(encoding="utf-8").splitlines() if line.strip()]
        added = len([line for line in new if line not in old])
        assert added <= 66, f"{after.name} adds {added} lines of code to {before.name}"
