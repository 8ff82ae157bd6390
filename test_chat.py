"""The contract (docs/protocol.md), checked against real servers and real clients: HTTP, the
websocket room, and the bridge between HTTP's threads and the loop that owns the room.

Each test starts the chat in this process on free ports (the `server` fixture, in
tests/fixtures.py; the helpers it calls are in tests/helpers.py). The rest of the tests, by
behaviour, are in tests/: the command line, clients that misbehave, the page in real browsers,
Redis, nginx. `python -m pytest test_chat.py` runs these alone, in seconds.
"""

import contextlib
import http.client
import json
import time

import chat  # before hug and anything that imports it: chat.py keeps hug away from NumPy 2

# isort: split

import pytest
from websockets.sync.client import connect

from tests.helpers import (
    PRESENCE_EVERY,
    all_changes,
    assert_everyone_got,
    chat_from_everywhere,
    close_code,
    get,
    joined,
    post,
    presence_changes,
    presence_frames,
    receive,
    refused_handshake,
    request,
    seed,
    stored_texts,
    wait_for_health,
    ws_url,
)

# --- HTTP: the page, the messages, the health -------------------------------------------


@pytest.mark.parametrize("path", ["/", "/chat"])
def test_page_is_served_as_utf8_html(server, path):
    status, content_type, body = request(server.port, "GET", path)
    assert status == 200
    assert content_type == "text/html; charset=utf-8"
    assert b'id="chat-box"' in body


def test_page_policy_allows_only_its_own_script_style_and_websocket(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/")
    policy = connection.getresponse().getheader("Content-Security-Policy")
    connection.close()
    assert "default-src 'none'" in policy
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    assert f"connect-src 'self' ws://127.0.0.1:{server.ws_port};" in policy


def test_config_tells_the_page_the_websocket_port(server):
    status, config = get(server.port, "/config")
    assert status == 200
    assert config["ws_port"] == server.ws_port


def test_config_tells_the_page_the_text_and_name_limits(server):
    _, config = get(server.port, "/config")
    assert (config["max_text"], config["max_name"]) == (2000, 32)


def test_post_answers_201_with_the_stored_message(server):
    status, message = post(server.port, "/messages", {"name": "alice", "text": "  hi  "})
    assert status == 201
    assert message["id"] == 1 and message["name"] == "alice" and message["text"] == "hi"
    assert message["ts"].endswith("Z") and message["ts"][10] == "T"


def test_post_without_name_gets_a_guest_name(server):
    _, message = post(server.port, "/messages", {"text": "hello"})
    assert message["name"].startswith("guest-")


def test_form_post_keeps_commas_and_utf8(server):
    status, message = post(
        server.port, "/messages", "name=j%C3%B6rg&text=a,b,c", "application/x-www-form-urlencoded"
    )
    assert status == 201
    assert (message["name"], message["text"]) == ("jörg", "a,b,c")


def test_get_messages_since_and_limit_oldest_first(server):
    for n in range(1, 6):
        post(server.port, "/messages", {"text": f"m{n}"})
    _, body = get(server.port, "/messages?since=1&limit=3")
    assert [m["text"] for m in body["messages"]] == ["m2", "m3", "m4"]
    _, body = get(server.port, "/messages")
    assert [m["id"] for m in body["messages"]] == [1, 2, 3, 4, 5]


def test_get_messages_gives_at_most_100_by_default(server):
    seed(150)
    _, body = get(server.port, "/messages")
    assert [m["id"] for m in body["messages"]] == list(range(1, 101))


def test_get_messages_since_finds_its_start_in_a_trimmed_history(small_server):
    for n in range(1, 6):
        post(small_server.port, "/messages", {"text": f"m{n}"})
    ids = lambda since: [
        m["id"] for m in get(small_server.port, f"/messages?since={since}")[1]["messages"]
    ]
    assert (ids(0), ids(1), ids(3), ids(4), ids(5), ids(99)) == (
        [3, 4, 5],
        [3, 4, 5],
        [4, 5],
        [5],
        [],
        [],
    )


def test_seed_tutorial_aliases_send_message_and_get_messages(server):
    status, message = post(
        server.port, "/send_message", "message=old+style", "application/x-www-form-urlencoded"
    )
    assert status == 201 and message["text"] == "old style"
    _, body = get(server.port, "/get_messages?since=0")
    assert [m["text"] for m in body["messages"]] == ["old style"]


def test_health_counts_clients_and_messages(server):
    post(server.port, "/messages", {"text": "one"})
    with connect(ws_url(server), open_timeout=5) as ws:
        receive(ws, "presence")  # joined: the room counts it now
        status, health = get(server.port, "/health")
        assert status == 200
        assert health["status"] == "ok" and health["clients"] == 1 and health["messages"] == 1


def test_health_last_id_counts_on_past_what_the_history_keeps(small_server):
    for n in range(5):
        post(small_server.port, "/messages", {"text": f"m{n}"})
    _, health = get(small_server.port, "/health")
    assert (health["messages"], health["last_id"]) == (3, 5)


def test_unknown_url_is_a_plain_404(server):
    status, _, body = request(server.port, "GET", "/nope")
    assert status == 404
    assert b"documentation" not in body


def test_history_keeps_the_newest_and_ids_keep_counting(small_server):
    for n in range(1, 6):
        post(small_server.port, "/messages", {"text": f"m{n}"})
    _, body = get(small_server.port, "/messages")
    assert [m["id"] for m in body["messages"]] == [3, 4, 5]


# --- HTTP bad input: 400 with a JSON body that names the field -------------------------


BAD_POSTS = [
    ({}, "text", "not supplied"),
    ({"text": ""}, "text", "text is empty"),
    ({"text": "   \n\t "}, "text", "text is empty"),
    ({"text": "x" * 2001}, "text", "longer than 2000"),
    ({"text": 42}, "text", "must be a string"),
    ({"text": {"x": 1}}, "text", "must be a string"),
    ({"text": ["a"]}, "text", "must be a string"),
    ({"text": None}, "text", "not supplied"),  # null is an absent field
    ({"text": "\ud800"}, "text", "not valid Unicode"),
    ({"text": "hi", "name": "n" * 33}, "name", "longer than 32"),
    ({"text": "hi", "name": ""}, "name", "empty"),
    ({"text": "hi", "name": 7}, "name", "must be a string"),
    ({"text": "hi", "name": "a\nb"}, "name", "control characters"),
]


@pytest.mark.parametrize("body, field, rule", BAD_POSTS)
def test_bad_post_is_a_400_naming_the_field_and_rule(server, body, field, rule):
    status, _, answer = request(server.port, "POST", "/messages", json.dumps(body))
    assert status == 400
    assert rule in json.loads(answer)["errors"][field]


def test_send_message_with_neither_text_nor_message_is_a_400_naming_text(server):
    status, body = post(
        server.port, "/send_message", "name=bob", "application/x-www-form-urlencoded"
    )
    assert status == 400 and "text" in body["errors"]
    assert get(server.port, "/messages")[1]["messages"] == []


def test_exactly_2000_characters_of_emoji_are_accepted(server):
    status, message = post(server.port, "/messages", {"text": "😀" * 2000})
    assert status == 201 and len(message["text"]) == 2000


@pytest.mark.parametrize(
    "body, content_type, rule",
    [
        ("{not json", "application/json", "not valid JSON"),
        (b"\xff\xfe", "application/json", "not valid UTF-8"),
        ("[" * 20000, "application/json", "not valid JSON"),
        (b"text=\xff", "application/x-www-form-urlencoded", "not valid UTF-8"),
        (b"\xff", "text/plain; charset=bogus-charset", "not valid UTF-8"),
    ],
)
def test_unreadable_body_is_a_400_not_a_500(server, body, content_type, rule):
    status, _, data = request(server.port, "POST", "/messages", body, content_type)
    assert status == 400
    assert rule in json.loads(data)["errors"]["body"]
    assert get(server.port, "/messages")[1]["messages"] == []


def test_a_bogus_charset_is_ignored_because_json_is_utf8(server):
    body = '{"text": "hé"}'.encode()
    status, _, data = request(
        server.port, "POST", "/messages", body, "application/json; charset=bogus-charset"
    )
    assert status == 201 and json.loads(data)["text"] == "hé"


@pytest.mark.parametrize(
    "query, field",
    [
        ("since=x", "since"),
        ("since=-1", "since"),
        ("since=%C2%B2", "since"),
        ("since=" + "9" * 5000, "since"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=" + "1" * 5000, "limit"),
        ("limit=%C2%B2", "limit"),
    ],
)
def test_bad_query_is_a_400_naming_the_parameter(server, query, field):
    status, body = get(server.port, f"/messages?{query}")
    assert status == 400
    assert field in body["errors"]


def test_huge_since_is_just_nothing_new(server):
    post(server.port, "/messages", {"text": "hi"})
    assert get(server.port, "/messages?since=" + "9" * 40) == (200, {"messages": []})


def test_body_over_64_kib_is_refused_with_413(server):
    status, _, _ = request(server.port, "POST", "/messages", {"text": "x" * 70000})
    assert status == 413


# --- The websocket room ----------------------------------------------------------------


def test_history_comes_first_with_the_last_50(server):
    seed(60)
    with joined(server) as (_, history):
        assert [m["id"] for m in history["messages"]] == list(range(11, 61))


def test_since_resumes_with_every_kept_message_after_it(server):
    seed(60)
    with joined(server, since=5) as (_, history):
        assert [m["id"] for m in history["messages"]] == list(range(6, 61))


def test_message_reaches_everyone_including_the_sender(server):
    with joined(server, name="alice") as (alice, _), joined(server, name="bob") as (bob, _):
        alice.send(json.dumps({"type": "message", "text": "hello bob"}))
        for ws in (alice, bob):
            message = receive(ws, "message")
            assert (message["name"], message["text"], message["id"]) == ("alice", "hello bob", 1)


def test_http_post_is_broadcast_to_websocket_clients(server):
    with joined(server) as (ws, _):
        post(server.port, "/messages", {"name": "curl", "text": "from http"})
        message = receive(ws, "message")
        assert (message["name"], message["text"]) == ("curl", "from http")


def test_plain_text_frame_is_a_message(server):
    with joined(server, name="cli") as (ws, _):
        ws.send("just typing")
        assert receive(ws, "message")["text"] == "just typing"
        ws.send("[1, 2]")  # JSON, but not an object
        assert receive(ws, "message")["text"] == "[1, 2]"


def test_presence_on_join_rename_and_leave(server):
    with joined(server, name="alice") as (alice, history):
        assert history["online"] == []  # who was there before her
        joined_alone = receive(alice, "presence")
        assert joined_alone == {
            "type": "presence",
            "joined": "alice",
            "changes": [{"joined": "alice"}],
        }
        with joined(server, name="bob") as (bob, bobs_history):
            presence_changes(bob, until=lambda changes: {"joined": "bob"} in changes)
            bob.send(json.dumps({"type": "name", "name": "robert"}))  # after his join went out
            changes = presence_changes(alice, until=lambda changes: len(changes) == 2)
            assert changes == [{"joined": "bob"}, {"renamed": {"from": "bob", "to": "robert"}}]
            assert bobs_history["online"] == ["alice"]
        left = receive(alice, "presence")
        assert left["left"] == "robert" and "online" not in left


def test_history_online_and_the_presence_changes_after_it_add_up_to_who_is_there(server):
    with joined(server, name="alice") as (alice, _):
        receive(alice, "presence")  # her join went out: the next changes wait up to 0.25 s
        with joined(server, name="bob"), joined(server, name="carol") as (carol, history):
            changes = presence_changes(carol, until=lambda changes: {"joined": "carol"} in changes)
            online = history["online"] + [change["joined"] for change in changes]
            assert sorted(online) == ["alice", "bob", "carol"]  # bob's join was still waiting: once


def test_a_burst_of_joins_is_sent_as_few_presence_frames(server):
    with joined(server, name="watcher") as (watcher, _):
        receive(watcher, "presence")  # its own join: the next changes wait for the 0.25 s window
        began = time.monotonic()
        with contextlib.ExitStack() as stack:
            for n in range(10):
                stack.enter_context(joined(server, name=f"p{n}"))
            frames = presence_frames(watcher, 10)
            took = time.monotonic() - began
    assert all_changes(frames) == [{"joined": f"p{n}"} for n in range(10)]
    assert len(frames) <= 1 + took / PRESENCE_EVERY  # one frame, then at most one every 0.25 s


def test_messages_after_rename_carry_the_new_name(server):
    with joined(server, name="bob") as (ws, _):
        ws.send(json.dumps({"type": "name", "name": "robert"}))
        ws.send(json.dumps({"type": "message", "text": "hi"}))
        assert receive(ws, "message")["name"] == "robert"


def test_echo_sends_each_frame_back(server):
    with connect(ws_url(server, "/echo"), open_timeout=5) as ws:
        ws.send("ping")
        assert ws.recv(timeout=5) == "ping"
        ws.send(b"\x00\x01")
        assert ws.recv(timeout=5) == b"\x00\x01"


def test_history_frame_tells_the_client_its_name_and_room(server):
    with joined(server) as (_, history):
        assert history["name"].startswith("guest-")
        assert history["room"] == get(server.port, "/config")[1]["room"]


def test_since_from_another_room_is_ignored_and_gives_the_last_50(server):
    for n in range(1, 4):
        post(server.port, "/messages", {"text": f"m{n}"})
    with joined(server, since=2, room="a-room-before-a-restart") as (_, history):
        assert [m["id"] for m in history["messages"]] == [1, 2, 3]
    with joined(server, since=2, room=get(server.port, "/config")[1]["room"]) as (_, history):
        assert [m["id"] for m in history["messages"]] == [3]


def test_chat_path_is_the_room_too(server):
    with connect(ws_url(server, "/chat"), open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "history"


def test_unknown_path_is_refused_with_404(server):
    assert refused_handshake(ws_url(server, "/nope")) == 404


def frames_but_presence(ws, count):
    frames = []
    while len(frames) < count:
        frame = json.loads(ws.recv(timeout=5))
        if frame["type"] != "presence":
            frames.append(frame)
    return frames


def test_ping_gets_a_pong_and_is_not_counted_as_a_message(server):
    with joined(server) as (ws, _):
        for _ in range(60):  # three times the burst of messages
            ws.send(json.dumps({"type": "ping"}))
        answers = [frame["type"] for frame in frames_but_presence(ws, 60)]
        assert answers == ["pong"] * 60
        ws.send("still allowed")
        assert receive(ws, "message")["text"] == "still allowed"


def test_websocket_text_and_name_are_trimmed(server):
    with joined(server, name="  padded  ") as (ws, history):
        assert history["name"] == "padded"
        ws.send(json.dumps({"type": "name", "name": " \tbob  "}))
        ws.send(json.dumps({"type": "message", "text": "\n  hi there  \n"}))
        message = receive(ws, "message")
    assert (message["name"], message["text"]) == ("bob", "hi there")


@pytest.mark.parametrize(
    "frame, error",
    [
        (json.dumps({"type": "message", "text": ""}), "text is empty"),
        (json.dumps({"type": "message", "text": "x" * 2001}), "longer than 2000"),
        (json.dumps({"type": "message"}), "must be a string"),
        (json.dumps({"type": "dance"}), "unknown type"),
        (json.dumps({"text": "no type"}), "unknown type"),
        (json.dumps({"type": "name", "name": "n" * 33}), "longer than 32"),
        ("   ", "text is empty"),
        (b"\x00binary", "binary"),
        ("[" * 30000, "longer than 2000"),
    ],
)
def test_bad_frame_gets_an_error_and_the_connection_stays(server, frame, error):
    with joined(server) as (ws, _):
        ws.send(frame)
        assert error in receive(ws, "error")["error"]
        ws.send("still here")
        assert receive(ws, "message")["text"] == "still here"
    assert get(server.port, "/messages")[1]["messages"][-1]["text"] == "still here"


@pytest.mark.parametrize(
    "frame, error",
    [
        ({"type": "message", "text": "\ud800"}, "text is not valid Unicode"),
        ({"type": "name", "name": "\ud800"}, "name is not valid Unicode"),
        ({"type": "name", "name": "a\nb"}, "name has control characters"),
        ({"type": "name", "name": "bell\x07"}, "name has control characters"),
        ({"type": "name", "name": " \t "}, "name is empty"),
    ],
)
def test_websocket_frames_follow_the_text_and_name_rules_of_http(server, frame, error):
    with joined(server, name="kept") as (ws, _):
        ws.send(json.dumps(frame))  # ASCII JSON: a lone surrogate travels as the escape \ud800
        assert error in receive(ws, "error")["error"]
        ws.send("still here")
        assert receive(ws, "message")["name"] == "kept"
    assert stored_texts(server.port) == ["still here"]


def test_bad_query_parameters_get_an_error_and_a_guest_name(server):
    with joined(server, name="n" * 40, since="abc") as (ws, _):
        errors = {receive(ws, "error")["error"] for _ in range(2)}
        assert any("name" in e for e in errors) and any("since" in e for e in errors)
        ws.send("hi")
        assert receive(ws, "message")["name"].startswith("guest-")


def test_frame_over_64_kib_closes_with_1009(server):
    with joined(server) as (ws, _):
        ws.send("x" * (64 * 1024 + 1))
        assert close_code(ws) == 1009


# --- The bridge: HTTP's threads ask the loop that owns the room (ask_room) ---------------


# Senders over websocket and over HTTP at once: every client sees one order, the stored one.


def test_concurrent_websocket_and_http_senders_give_everyone_the_same_order(server):
    ws_senders = [ws_url(server, name=f"sender{n}") for n in range(5)]
    listeners = [ws_url(server, name=f"listener{n}") for n in range(3)]
    http_senders = [(server.port, f"127.0.0.{10 + n}") for n in range(5)]
    results = chat_from_everywhere(ws_senders, listeners, http_senders)
    assert_everyone_got(results, get(server.port, "/messages?limit=1000")[1]["messages"])


def test_a_post_the_busy_loop_cannot_answer_in_time_is_a_503_and_never_stored(server, monkeypatch):
    monkeypatch.setattr(chat, "HTTP_WAIT", 0.2)  # 5 s in real life; the mechanism is the same
    server.loop.call_soon_threadsafe(time.sleep, 1)  # the loop is busy for a second
    status, _, body = request(server.port, "POST", "/messages", {"text": "too late"})
    assert status == 503 and "too busy" in json.loads(body)["errors"]["room"]
    monkeypatch.setattr(chat, "HTTP_WAIT", 5)
    wait_for_health(server.port, messages=0)  # the loop is back, and did not store it after all
    assert stored_texts(server.port) == []
