"""Scaling out: two chat.py processes, one room in Redis."""

import json
import shutil
import subprocess
import sys

import pytest
from websockets.sync.client import connect

from tests.helpers import (
    CHAT_PY,
    assert_everyone_got,
    chat_from_everywhere,
    free_port,
    get,
    post,
    receive,
    request,
    stored_texts,
    wait_for_health,
)


@pytest.mark.redis
def test_redis_senders_on_both_processes_give_every_client_the_same_order(two_processes):
    a, b = two_processes
    ws_senders = [f"ws://127.0.0.1:{p.ws_port}/" for p in (a, b)]
    listeners = [f"ws://127.0.0.1:{p.ws_port}/" for p in (a, b)]
    http_senders = [(a.port, "127.0.4.1"), (b.port, "127.0.4.2")]
    results = chat_from_everywhere(ws_senders, listeners, http_senders)
    stored_a = get(a.port, "/messages")[1]["messages"]
    assert stored_a == get(b.port, "/messages")[1]["messages"]
    assert_everyone_got(results, stored_a)


@pytest.mark.redis
def test_redis_a_client_can_resume_on_the_other_process_and_miss_nothing(two_processes):
    a, b = two_processes
    with connect(f"ws://127.0.0.1:{a.ws_port}/", open_timeout=5, max_queue=None) as ws:
        room_id = receive(ws, "history")["room"]
        for n in range(3):
            post(a.port, "/messages", {"text": f"before {n}"})
        last_seen = [receive(ws, "message")["id"] for _ in range(3)][-1]
    for n in range(3):
        post(b.port, "/messages", {"text": f"while away {n}"})
    wait_for_health(b.port, last_id=6)  # b stores in Redis, then delivers what Redis publishes
    url = f"ws://127.0.0.1:{b.ws_port}/?since={last_seen}&room={room_id}"
    with connect(url, open_timeout=5, max_queue=None) as ws:
        history = receive(ws, "history")
        assert history["room"] == room_id
        assert [m["text"] for m in history["messages"]] == [f"while away {n}" for n in range(3)]


@pytest.mark.redis
def test_redis_going_away_gives_errors_and_degraded_health_then_recovers(
    redis_server, two_processes
):
    a, b = two_processes
    post(a.port, "/messages", {"text": "before"})
    for process in two_processes:  # each has it once Redis published it: it is history, not live
        wait_for_health(process.port, last_id=1)
    with (
        connect(f"ws://127.0.0.1:{a.ws_port}/", open_timeout=5, max_queue=None) as on_a,
        connect(f"ws://127.0.0.1:{b.ws_port}/", open_timeout=5, max_queue=None) as on_b,
    ):
        receive(on_a, "history"), receive(on_b, "history")
        redis_server.stop()
        on_a.send("while redis is away")
        assert "cannot store" in receive(on_a, "error")["error"]
        status, body = post(b.port, "/messages", {"text": "also while away"})
        assert status == 503 and "room" in body["errors"]
        wait_for_health(a.port, status="degraded")
        assert request(a.port, "GET", "/health")[0] == 503

        redis_server.start()
        wait_for_health(a.port, status="ok")
        wait_for_health(b.port, status="ok")
        assert post(b.port, "/messages", {"text": "back"})[0] == 201
        for ws in (on_a, on_b):
            message = receive(ws, "message")
            assert (message["id"], message["text"]) == (2, "back")
    assert stored_texts(a.port) == ["before", "back"]


@pytest.mark.redis
def test_redis_restarted_without_its_data_ids_go_on_and_nothing_is_doubled(
    redis_server, two_processes
):
    a, b = two_processes
    for n in range(3):
        post(a.port, "/messages", {"text": f"before {n}"})
    wait_for_health(b.port, last_id=3)  # b has them once Redis published them to it
    with connect(f"ws://127.0.0.1:{b.ws_port}/", open_timeout=5, max_queue=None) as on_b:
        assert len(receive(on_b, "history")["messages"]) == 3
        redis_server.stop()
        shutil.rmtree(redis_server.directory)  # a Redis that keeps nothing, or a new one
        redis_server.directory.mkdir()
        redis_server.start()
        # the first command after a restart finds its connection cut
        wait_for_health(a.port, status="ok")
        status, message = post(a.port, "/messages", {"text": "after"})
        assert status == 201 and message["id"] == 4
        assert (receive(on_b, "message")["id"]) == 4
    assert [m["id"] for m in get(b.port, "/messages")[1]["messages"]] == [1, 2, 3, 4]


def test_redis_unreachable_at_start_is_one_line_and_exit_2(chat_process):
    process = chat_process(
        "--port", "0", "--ws-port", "0", "--redis", f"redis://127.0.0.1:{free_port()}/0"
    )
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and "cannot reach Redis" in error


def test_the_default_chat_does_not_import_redis():
    code = "import sys, chat; s = chat.Servers(chat.Settings(port=0, ws_port=0)); s.stop(); print('redis' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=CHAT_PY.parent,
        check=False,
    )
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.redis
def test_redis_a_ref_sent_again_to_the_other_process_is_stored_once(two_processes):
    a, b = two_processes
    status, first = post(a.port, "/messages", {"text": "once", "ref": "shared"})
    assert status == 201
    assert post(b.port, "/messages", {"text": "once", "ref": "shared"}) == (200, first)
    with connect(f"ws://127.0.0.1:{b.ws_port}/", open_timeout=5, max_queue=None) as ws:
        receive(ws, "history")
        ws.send(json.dumps({"type": "message", "text": "once", "ref": "shared"}))
        assert receive(ws, "message") == first
    assert stored_texts(a.port) == ["once"]
