"""A transient failure is not a refusal. An error that sending the same message again can cure
(too fast, the room away) says `retry_after` in its frame, and HTTP answers 503 (429 for too
fast) with Retry-After; the page then sends it again by itself. A refusal for good says no
such thing.
"""

import json
import threading

import chat

# isort: split
import pytest
import websockets
from websockets.sync.client import connect

from tests.helpers import (
    BURST,
    PER_SECOND,
    joined,
    post,
    receive,
    receive_until,
    request,
    running_servers,
    say,
    stored_texts,
    texts,
    the_room,
    ws_url,
)


def message_frame(text, ref):
    return json.dumps({"type": "message", "text": text, "ref": ref})


def test_a_too_fast_error_says_when_the_limit_allows_one_more_and_then_it_is_stored(server):
    with joined(server) as (ws, _):
        for n in range(2 * BURST):
            ws.send(message_frame(f"m{n}", f"r{n}"))
        answers = receive_until(ws, lambda got: len(got) == 2 * BURST, ("message", "error"))
        refused = [frame for frame in answers if frame["type"] == "error"]
        assert refused and all(0 < e["retry_after"] <= 1 / PER_SECOND for e in refused)
        last, probes = answers[-1], 0
        while last["type"] != "error":  # a refill let the last ones in: one more, refused
            probes += 1
            ws.send(message_frame("probe", f"probe{probes}"))
            last = receive_until(ws, lambda got: got, ("message", "error"))[0]
        threading.Event().wait(last["retry_after"])  # no frame of ours came after it
        ws.send(message_frame("again", last["ref"]))
        again = receive_until(ws, lambda got: got, ("message", "error"))[0]
        assert again["type"] == "message" and again["ref"] == last["ref"]


def test_a_refusal_that_sending_again_cannot_cure_has_no_retry_after(server):
    bad_name = json.dumps({"type": "name", "name": "\u202eevil"})  # a right-to-left override
    with joined(server) as (ws, _):
        for frame in [
            message_frame("x" * 2001, "long"),
            message_frame("hi", 7),
            '{"type": 1}',
            bad_name,
        ]:
            ws.send(frame)
            assert "retry_after" not in receive(ws, "error")
        ws.send(b"binary")
        assert "retry_after" not in receive(ws, "error")


def test_a_post_the_busy_loop_cannot_answer_in_time_says_retry_after(server, monkeypatch):
    monkeypatch.setattr(chat, "HTTP_WAIT", 0.2)
    busy = threading.Event()
    server.loop.call_soon_threadsafe(busy.wait, 10)  # busy until the 503 came, however slow
    try:
        response = request(server.port, "POST", "/messages", {"text": "too late", "ref": "late"})
    finally:
        busy.set()
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    monkeypatch.setattr(chat, "HTTP_WAIT", 5)
    assert post(server.port, "/messages", {"text": "too late", "ref": "late"})[0] == 201
    assert stored_texts(server.port) == ["too late"]


@pytest.mark.redis
def test_redis_away_says_retry_after_and_the_same_ref_goes_through_once_it_is_back(
    redis_server, two_processes
):
    a, b = two_processes
    with connect(f"ws://127.0.0.1:{a.ws_port}/", open_timeout=5, max_queue=None) as ws:
        receive(ws, "history")
        redis_server.stop()
        ws.send(message_frame("while away", "away-1"))
        error = receive(ws, "error")
        assert error["ref"] == "away-1" and error["retry_after"] == 1
        response = request(b.port, "POST", "/messages", {"text": "while away", "ref": "away-1"})
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        redis_server.start()
        for _ in range(20):  # what the page does: the same ref again, after retry_after
            ws.send(message_frame("while away", "away-1"))
            answer = receive_until(ws, lambda got: got, ("message", "error"))[0]
            if answer["type"] == "message":
                break
            threading.Event().wait(answer["retry_after"])
        assert answer["ref"] == "away-1"
    assert post(b.port, "/messages", {"text": "while away", "ref": "away-1"})[0] == 200
    assert stored_texts(a.port) == ["while away"]


@pytest.mark.browser
def test_browser_a_paste_of_30_quick_sends_all_go_through_in_order_without_a_click(
    server, open_page, monkeypatch
):
    from playwright.sync_api import expect

    monkeypatch.setattr(the_room().message_buckets, "burst", 3)  # most wait for the limit
    page = open_page(server.port)
    page.evaluate("""() => {
        const form = document.getElementById("chat-form");
        for (let n = 0; n < 30; n++) {
            document.getElementById("message-input").value = "burst " + n;
            form.requestSubmit();
        }
    }""")
    expect(page.locator("#outbox .message.failed")).to_have_count(0)
    expected = [f"burst {n}" for n in range(30)]
    expect(texts(page)).to_have_text(expected, timeout=30_000)
    expect(page.locator("#outbox .message")).to_have_count(0)
    assert stored_texts(server.port) == expected


@pytest.mark.browser
def test_browser_a_refusal_for_good_keeps_send_again_and_edit_and_the_next_one_goes(
    server, open_page
):
    from playwright.sync_api import expect

    page = open_page(server.port)
    page.evaluate("""() => {
        document.getElementById("message-input").value = "half an emoji \\ud83d";
        document.getElementById("chat-form").requestSubmit();
    }""")
    failed = page.locator("#outbox .message.failed")
    expect(failed).to_contain_text("Not sent: text is not valid Unicode")
    expect(failed.get_by_role("button", name="Send again")).to_be_visible()
    expect(failed.get_by_role("button", name="Edit")).to_be_visible()
    say(page, "the next one")
    expect(texts(page)).to_have_text(["the next one"])
    expect(failed).to_have_count(1)


@pytest.mark.browser
@pytest.mark.redis
def test_browser_what_is_typed_while_redis_is_away_goes_when_it_is_back_without_a_click(
    redis_server, two_processes, open_page
):
    from playwright.sync_api import expect

    a, _ = two_processes
    page = open_page(a.port, "alice")
    redis_server.stop()
    for n in range(3):
        say(page, f"away {n}")
    waiting = page.locator("#outbox .message")
    expect(waiting).to_have_count(3)
    expect(waiting.first).to_contain_text("Not sent yet: the chat asked to wait a moment")
    redis_server.start()
    expect(texts(page)).to_have_text(["away 0", "away 1", "away 2"], timeout=20_000)
    expect(page.locator("#outbox .message")).to_have_count(0)
    assert stored_texts(a.port) == ["away 0", "away 1", "away 2"]


@pytest.mark.browser
def test_browser_online_a_message_the_chat_asks_to_wait_does_not_say_when_the_chat_is_back(
    server, open_page, monkeypatch
):
    """Past the burst, with the status "online" and no banner, every message waiting said
    "it goes as soon as the chat is back"."""
    from playwright.sync_api import expect

    monkeypatch.setattr(the_room().message_buckets, "burst", 3)  # most of the 30 wait
    page = open_page(server.port, "alice")
    page.evaluate("""() => {
        const form = document.getElementById("chat-form");
        for (let n = 0; n < 30; n++) {
            document.getElementById("message-input").value = "burst " + n;
            form.requestSubmit();
        }
    }""")
    expect(page.locator("#outbox .message.later .state")).to_have_text(
        "Not sent yet: the chat asked to wait a moment; it goes again by itself."
    )
    expect(page.locator("#outbox")).not_to_contain_text("when the chat is back")
    expect(page.locator("#outbox")).not_to_contain_text("as soon as the chat is back")
    expect(texts(page)).to_have_text([f"burst {n}" for n in range(30)], timeout=20_000)


def test_a_full_room_says_retry_after_on_the_handshake():
    with (
        running_servers(max_clients=1) as servers,
        joined(servers),
        pytest.raises(websockets.exceptions.InvalidStatus) as refused,
        connect(ws_url(servers), open_timeout=5),
    ):
        pass
    assert refused.value.response.status_code == 503
    assert refused.value.response.headers["Retry-After"] == "1"


def test_a_degraded_health_says_retry_after_as_every_other_503(server, monkeypatch):
    async def degraded():  # what the Redis room answers while Redis is away
        return {"status": "degraded", "clients": 0, "messages": 0, "last_id": 0}

    monkeypatch.setattr(server.room, "health", degraded)
    answer = request(server.port, "GET", "/health")
    assert answer.status == 503 and answer.headers["Retry-After"] == "1"
