"""--store when the file or its disk is not what the chat expects: damaged, contended, read-only,
full. The chat refuses to start with one line that says what to do (exit 2), or keeps serving
and logs what fails once per interval; it never runs silently on a file it cannot keep.
"""

import contextlib
import functools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys

import pytest
from websockets.sync.client import connect

from parts.logs import ONCE_PER_INTERVAL
from parts.sqlite_history import HistoryFile
from tests.helpers import CHAT_PY, get, post, receive, request, running_servers, seed

IN_CI = os.environ.get("CI") == "true"


@pytest.fixture
def chats(chat_process):
    """chat_process() on ports the system picks."""
    return functools.partial(chat_process, "--port", "0", "--ws-port", "0")


def refusal(process):
    """What a chat that must not start printed: exactly one line on stderr, and exit 2."""
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and error.startswith("chat.py: error: "), error
    return error


def stopped_cleanly(process):
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(10) == 0


def make_store(path, messages, size=80):
    """A store file as the chat writes it (its own schema), with ids 1 to `messages`."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(HistoryFile.SCHEMA)
        db.execute("INSERT INTO room VALUES ('id', '0123456789abcdef')")
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO messages VALUES (?, 'seed', ?, '2026-12-06T10:00:00.000Z', NULL)",
            ((n, f"m{n} " + "x" * size) for n in range(1, messages + 1)),
        )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file itself


def overwrite_an_old_page(path):
    """What a bad sector or a stray write does: one page, among the oldest messages', is junk."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        page_size, pages = (
            db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count")
        )
    with open(path, "r+b") as file:
        file.seek(page_size * (pages // 4))
        file.write(b"\xde\xad\xbe\xef" * (page_size // 4))


# --- A damaged file ---------------------------------------------------------------------


def test_a_damaged_store_is_refused_at_start_with_what_to_do(chats, tmp_path):
    store = tmp_path / "room.db"
    make_store(store, 2000)
    overwrite_an_old_page(store)
    error = refusal(chats("--store", str(store), "--history", "1000"))
    assert f"--store {store}" in error and "is damaged" in error
    assert "move it away" in error and "copy" in error


def test_a_guest_count_that_is_not_a_number_is_a_damaged_store(chats, tmp_path):
    store = tmp_path / "room.db"
    make_store(store, 3)
    with contextlib.closing(sqlite3.connect(store, isolation_level=None)) as db:
        db.execute("INSERT INTO room VALUES ('guests', 'many')")
    error = refusal(chats("--store", str(store)))
    assert "is damaged" in error and "guest count" in error and "move it away" in error


def test_a_trim_that_fails_is_logged_once_per_interval_not_swallowed(tmp_path, caplog, monkeypatch):
    """The file is bounded by --history only while its old messages can be deleted: when
    they cannot, the file grows, and the log must say so (once per interval, not per trim)."""
    monkeypatch.setattr(ONCE_PER_INTERVAL, "last_logged", {})  # as if nothing logged yet
    store = tmp_path / "room.db"
    make_store(store, 0)
    with contextlib.closing(sqlite3.connect(store, isolation_level=None)) as db:
        db.execute(  # a delete that fails every time, as on a damaged page
            "CREATE TRIGGER keep_all BEFORE DELETE ON messages BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
    with running_servers(history=3, store=str(store)) as servers:
        seed(250)  # trims are tried at ids 100 and 200
        assert get(servers.port, "/health")[1]["last_id"] == 250
    failed = [r for r in caplog.records if "--history" in r.getMessage()]
    assert len(failed) == 1 and "no" in failed[0].getMessage()


# --- Two starts at the same instant -----------------------------------------------------

# chat.py with SQLite's connect wrapped, to play the race the same way every time. Both
# processes open the new file and read it (keeping what they read locked, as the chat's
# exclusive locking mode does) before either writes to it: the moment two starts at the same
# instant share. And the one that fails first is paused for 50 ms before it lets go of the
# file, as a loaded machine may pause it. Left to the scheduler, one start in five failed.
STARTS_TOGETHER = """
import sqlite3, sys, time
import chat

class PausedBeforeItLetsGo(sqlite3.Connection):
    def close(self):
        time.sleep(0.05)
        super().close()

connect = sqlite3.connect

def opened_and_read_with_the_other(path, *args, **kwargs):
    db = connect(path, *args, factory=PausedBeforeItLetsGo, **kwargs)
    db.execute("PRAGMA locking_mode = EXCLUSIVE")
    db.execute("SELECT count(*) FROM sqlite_master").fetchall()
    print("read", file=sys.stderr, flush=True)
    sys.stdin.readline()  # the other process has read it too
    return db

sqlite3.connect = opened_and_read_with_the_other
sys.exit(chat.main(sys.argv[1:]))
"""


@pytest.mark.timeout(180)
def test_two_chats_started_together_on_a_new_file_one_runs_the_other_says_in_use(tmp_path):
    for attempt in range(10):
        store = str(tmp_path / f"room{attempt}.db")
        pair = [starting_together(store) for _ in range(2)]
        try:
            for process in pair:
                assert process.stderr.readline() == "read\n"
            for process in pair:
                process.stdin.write("go\n")
                process.stdin.flush()
            outcomes = [outcome(process) for process in pair]
            assert sorted(o[0] for o in outcomes) == ["in use", "running"], f"start {attempt}"
            port = next(port for what, port in outcomes if what == "running")
            assert request(port, "GET", "/health")[0] == 200
        finally:
            for process in pair:
                process.kill()
                process.wait(5)
                for pipe in (process.stdin, process.stdout, process.stderr):
                    pipe.close()


def starting_together(store):
    return subprocess.Popen(
        [sys.executable, "-c", STARTS_TOGETHER, "--port", "0", "--ws-port", "0", "--store", store],
        cwd=CHAT_PY.parent,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def outcome(process):
    """("running", its HTTP port) once it printed its URL, or ("in use", None) once it exited
    2 saying so; it does one or the other within seconds."""
    line = process.stdout.readline()  # "Chat page:  http://127.0.0.1:PORT/", or "" at its exit
    if line:
        return "running", int(line.rsplit(":", 1)[1].strip("/\n"))
    error = process.stderr.read()
    assert process.wait(10) == 2 and error.count("\n") == 1, error
    return ("in use" if "in use" in error else error), None


# --- Guest numbers ----------------------------------------------------------------------


def guest_name_of_a_new_client(process):
    with connect(f"ws://127.0.0.1:{process.ws_port}/", open_timeout=5) as ws:
        return receive(ws, "history")["name"]


@pytest.mark.parametrize("stop", ["SIGTERM", "kill -9"])
def test_guest_numbers_given_after_the_last_post_are_kept_over_a_restart(chats, tmp_path, stop):
    store = str(tmp_path / "room.db")
    before = chats("--store", store)
    before.urls()
    assert post(before.port, "/messages", {"text": "hi"})[1]["name"] == "guest-1"
    assert guest_name_of_a_new_client(before) == "guest-2"  # after the last post
    if stop == "SIGTERM":
        stopped_cleanly(before)
    else:
        before.process.kill()  # once a name is given, it is on disk
        before.process.wait(5)
    after = chats("--store", store)
    after.urls()
    assert guest_name_of_a_new_client(after) == "guest-3"


# --- Files the chat may not write -------------------------------------------------------


@contextlib.contextmanager
def read_only(path):
    """`path` read-only for this process, root included. Root ignores permission bits, so
    then the immutable attribute (chattr +i), or where the file system has none, a read-only
    bind mount of `path` on itself: both bind root too."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    ways = [  # (make it read-only, ..., undo it)
        [["chattr", "+i", str(path)], ["chattr", "-i", str(path)]],
        [
            ["mount", "--bind", str(path), str(path)],
            ["mount", "-o", "remount,bind,ro", str(path)],
            ["umount", str(path)],
        ],
    ]
    for *steps, undo in ways:
        done = 0
        while done < len(steps) and run(steps[done]):  # each step only after the one before
            done += 1
        if done == len(steps):
            try:
                yield
            finally:
                subprocess.run(undo, check=True)
            return
        if done:
            subprocess.run(undo, check=True)
    reason = "root ignores permission bits, and neither chattr +i nor a read-only bind mount works"
    if IN_CI:
        pytest.fail(f"{reason}: CI must run this test")
    pytest.skip(reason)


def run(command):
    """True if `command` ran and succeeded."""
    return (
        bool(shutil.which(command[0]))
        and not subprocess.run(command, capture_output=True, check=False).returncode
    )


def a_store_in_wal_mode(chats, folder):
    """A store the chat made and then stopped cleanly: the file exists, in WAL mode."""
    folder.mkdir()
    store = folder / "room.db"
    process = chats("--store", str(store))
    process.urls()
    assert post(process.port, "/messages", {"text": "kept"})[0] == 201
    stopped_cleanly(process)
    return store


def test_a_store_in_a_folder_the_chat_may_not_write_says_so(chats, tmp_path):
    store = a_store_in_wal_mode(chats, tmp_path / "room")
    with read_only(store.parent):
        error = refusal(chats("--store", str(store)))
    assert f"write permission on the folder {store.parent}" in error


def test_a_read_only_store_file_says_so(chats, tmp_path):
    store = a_store_in_wal_mode(chats, tmp_path / "room")
    with read_only(store):
        error = refusal(chats("--store", str(store)))
    assert f"read and write permission on {store}" in error


# --- A full disk ------------------------------------------------------------------------


@contextlib.contextmanager
def small_file_system(path, size="200k"):
    """A tmpfs of `size` at `path`: a disk that fills up within a few hundred messages."""
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True, check=False).returncode:
        if IN_CI:
            pytest.fail(f"{' '.join(mount)} failed: CI must run this test")
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_is_logged_once_per_interval_not_per_message(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(ONCE_PER_INTERVAL, "last_logged", {})  # as if nothing logged yet
    with (
        small_file_system(tmp_path / "small") as small,
        running_servers(store=str(small / "room.db")) as servers,
    ):
        answers = []
        for n in range(400):  # each from an address of its own: no rate limit in the way
            answers.append(
                post(
                    servers.port,
                    "/messages",
                    {"text": "x" * 2000},
                    source=f"127.0.{n // 200}.{n % 200 + 1}",
                )[0]
            )
            if answers[-20:] == [503] * 20:
                break
        assert answers[-20:] == [503] * 20, "the disk never filled"
    full = [r for r in caplog.records if "cannot write messages" in r.getMessage()]
    assert len(full) == 1 and "full" in full[0].getMessage()


# --- Small things: the query string's bytes, the key from the environment ---------------


def test_a_query_string_that_is_not_utf8_is_a_400_like_a_body():
    with running_servers() as servers:
        status, _, body = request(servers.port, "POST", "/messages?text=%ff")
        assert status == 400 and "UTF-8" in json.loads(body)["errors"]["query"]
        assert request(servers.port, "POST", "/messages?text=%C3%A9")[0] == 201  # é is fine
        assert [m["text"] for m in get(servers.port, "/messages")[1]["messages"]] == ["é"]


@pytest.mark.parametrize(
    "args, key, error",
    [
        ([], "short", "CHAT_KEY: a room key is 16 or more"),
        (["--no-key"], "a-room-key-for-the-tests-0123", "CHAT_KEY and --no-key: choose one"),
    ],
)
def test_a_bad_key_from_the_environment_is_called_chat_key(chats, args, key, error):
    process = chats(*args, env={**os.environ, "CHAT_KEY": key})
    assert refusal(process).startswith(f"chat.py: error: {error}")
