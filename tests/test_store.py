"""--store: the room kept in SQLite over a crash and a restart: ids, messages, refs and guest
numbers go on, and a client resuming over a restart misses nothing and gets nothing twice.
"""

import asyncio
import contextlib
import json
import sqlite3

from parts import sqlite_history

# isort: split
import pytest
from websockets.sync.client import connect

from tests.helpers import (
    ask_room,
    assert_everyone_got,
    chat_from_everywhere,
    get,
    joined,
    post,
    receive,
    receive_history,
    running_servers,
    seed,
    stored_texts,
    the_room,
    ws_url,
)


def started(chat_process, *args):
    process = chat_process("--port", "0", "--ws-port", "0", *args)
    process.urls()
    return process


def crash(process):
    """kill -9: nothing is flushed, closed or said goodbye to."""
    process.process.kill()
    process.process.wait(5)


def test_store_keeps_ids_room_messages_and_refs_over_a_crash_and_restart(chat_process, tmp_path):
    store = str(tmp_path / "room.db")
    before = started(chat_process, "--store", store)
    room_id = get(before.port, "/config")[1]["room"]
    stored = [post(before.port, "/messages", {"text": f"m{n}", "ref": f"r{n}"})[1] for n in (1, 2)]
    with connect(f"ws://127.0.0.1:{before.ws_port}/?name=ann", open_timeout=5) as ws:
        receive(ws, "history")
        ws.send(json.dumps({"type": "message", "text": "from ann", "ref": "w1"}))
        stored.append(receive(ws, "message"))
    crash(before)  # each message was acknowledged (201, or its frame): it is on disk
    after = started(chat_process, "--store", store)
    assert get(after.port, "/config")[1]["room"] == room_id
    assert get(after.port, "/messages")[1]["messages"] == stored
    assert post(after.port, "/messages", {"text": "m2", "ref": "r2"}) == (200, stored[1])
    assert post(after.port, "/messages", {"text": "m4"})[1]["id"] == 4


def test_a_client_resuming_over_a_restart_misses_nothing_and_gets_nothing_twice(
    chat_process, tmp_path
):
    store = str(tmp_path / "room.db")
    before = started(chat_process, "--store", store)
    for n in (1, 2):
        post(before.port, "/messages", {"text": f"m{n}"})
    with connect(f"ws://127.0.0.1:{before.ws_port}/", open_timeout=5) as ws:
        history = receive(ws, "history")
    seen, room_id = history["messages"][-1]["id"], history["room"]
    for n in (3, 4):  # while the client is away
        post(before.port, "/messages", {"text": f"m{n}"})
    crash(before)
    after = started(chat_process, "--store", store)
    post(after.port, "/messages", {"text": "m5"})
    url = f"ws://127.0.0.1:{after.ws_port}/?since={seen}&room={room_id}"
    with connect(url, open_timeout=5, max_queue=None) as ws:
        history = receive_history(ws)
        post(after.port, "/messages", {"text": "m6"})
        live = receive(ws, "message")
    assert [(m["id"], m["text"]) for m in history["messages"] + [live]] == [
        (3, "m3"),
        (4, "m4"),
        (5, "m5"),
        (6, "m6"),
    ]


def test_a_restart_keeps_the_newest_history_messages(chat_process, tmp_path):
    store = str(tmp_path / "room.db")
    before = started(chat_process, "--store", store, "--history", "3")
    for n in range(1, 6):
        post(before.port, "/messages", {"text": f"m{n}"})
    crash(before)
    after = started(chat_process, "--store", store, "--history", "3")
    assert stored_texts(after.port) == ["m3", "m4", "m5"]
    assert post(after.port, "/messages", {"text": "m6"})[1]["id"] == 6


def test_the_store_file_is_bounded_by_history(tmp_path):
    with running_servers(history=3, store=str(tmp_path / "room.db")):
        seed(250)
    with contextlib.closing(sqlite3.connect(tmp_path / "room.db")) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM messages ORDER BY id")]
    assert ids[-3:] == [248, 249, 250] and len(ids) <= 3 + sqlite_history.HistoryFile.TRIM_EVERY


def test_guest_numbers_go_on_over_a_restart(chat_process, tmp_path):
    store = str(tmp_path / "room.db")
    before = started(chat_process, "--store", store)
    assert post(before.port, "/messages", {"text": "hi"})[1]["name"] == "guest-1"
    crash(before)
    after = started(chat_process, "--store", store)
    assert post(after.port, "/messages", {"text": "hi"})[1]["name"] == "guest-2"


@pytest.mark.parametrize(
    "setup, args, error",
    [
        (None, ["--redis", "redis://127.0.0.1:9/0"], "--store and --redis do not go together"),
        ("in use", [], "is in use (is another chat.py running with it?)"),
        ("not a database", [], "file is not a database"),
    ],
)
def test_a_store_the_chat_cannot_use_is_one_line_and_exit_2(
    chat_process, tmp_path, setup, args, error
):
    store = tmp_path / "room.db"
    if setup == "in use":
        started(chat_process, "--store", str(store))
    elif setup == "not a database":
        store.write_text("my notes, not a database\n" * 100)
    process = chat_process("--port", "0", "--ws-port", "0", "--store", str(store), *args)
    assert process.process.wait(15) == 2
    message = process.process.stderr.read()
    assert message.count("\n") == 1 and message.startswith("chat.py: error: ") and error in message


def test_concurrent_senders_give_everyone_the_same_order_with_a_store(tmp_path):
    with running_servers(store=str(tmp_path / "room.db")) as servers:
        ws_senders = [ws_url(servers, name=f"sender{n}") for n in range(3)]
        listeners = [ws_url(servers, name=f"listener{n}") for n in range(2)]
        http_senders = [(servers.port, f"127.0.0.{10 + n}") for n in range(3)]
        results = chat_from_everywhere(ws_senders, listeners, http_senders)
        stored = get(servers.port, "/messages?limit=1000")[1]["messages"]
    assert_everyone_got(results, stored)
    with contextlib.closing(sqlite3.connect(tmp_path / "room.db")) as db:
        on_disk = db.execute("SELECT id, text FROM messages ORDER BY id").fetchall()
    assert on_disk == [(m["id"], m["text"]) for m in stored]


def test_a_ref_sent_again_while_its_message_is_being_written_is_stored_once(tmp_path):
    with running_servers(store=str(tmp_path / "room.db")) as servers:

        async def twice():
            return await asyncio.gather(*(the_room().post("ann", "once", "r") for _ in range(2)))

        (first, stored_now), (again, stored_again) = ask_room(twice())
        assert (stored_now, stored_again) == (True, False) and again == first
        assert stored_texts(servers.port) == ["once"]


def test_a_store_that_cannot_write_refuses_the_message_and_keeps_serving(tmp_path):
    with running_servers(store=str(tmp_path / "room.db")) as servers:
        assert post(servers.port, "/messages", {"text": "before"})[0] == 201
        db = the_room().history.file.db  # the writer's own connection: no write is under way now
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")  # a full disk, as SQLite sees it
        with joined(servers) as (ws, _):
            answers = [post(servers.port, "/messages", {"text": "x" * 2000}) for _ in range(4)]
            status, body = answers[-1]  # the free room of the file's last page is taken by now
            assert status == 503 and "cannot store messages" in body["errors"]["room"]
            ws.send(json.dumps({"type": "message", "text": "y" * 2000, "ref": "y"}))
            assert receive(ws, "error") == {
                "type": "error",
                "error": "the chat cannot store messages right now: try again soon",
                "ref": "y",
                "retry_after": 1,  # the page sends it again by itself, once there is room
            }
            db.execute("PRAGMA max_page_count = 1073741823")  # room again
            assert post(servers.port, "/messages", {"text": "after"})[0] == 201
            assert receive(ws, "message")["text"] == "after"  # nothing refused was delivered
        stored = ["x" * 2000 for status, _ in answers if status == 201]
        assert stored_texts(servers.port) == ["before", *stored, "after"]
