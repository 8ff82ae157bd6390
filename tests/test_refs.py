"""A message's ref: a message sent again with the same ref is stored once, and the answer says
which message it was; a bad ref is refused naming the rule.
"""

import json

# isort: split
import pytest

from tests.helpers import get, joined, post, receive, stored_texts, the_room


def test_a_repeated_ref_gets_the_stored_message_back_and_stores_nothing(server):
    with joined(server) as (ws, _), joined(server) as (other, _):
        ws.send(json.dumps({"type": "message", "text": "once", "ref": "r1"}))
        first = receive(ws, "message")
        assert first["ref"] == "r1" and receive(other, "message") == first
        ws.send(json.dumps({"type": "message", "text": "once", "ref": "r1"}))
        assert receive(ws, "message") == first  # the same message again, to the sender only
        ws.send(json.dumps({"type": "message", "text": "next", "ref": "r2"}))
        assert receive(other, "message")["text"] == "next"  # not "once" a second time
    assert stored_texts(server.port) == ["once", "next"]


@pytest.mark.parametrize("path", ["/messages", "/send_message"])
def test_a_repeated_ref_over_http_answers_200_with_the_stored_message(server, path):
    status, first = post(server.port, path, {"text": "hello", "ref": "abc"})
    assert status == 201 and first["ref"] == "abc"
    assert post(server.port, path, {"text": "hello", "ref": "abc"}) == (200, first)
    assert len(get(server.port, "/messages")[1]["messages"]) == 1


@pytest.mark.parametrize("ref", ["", "x" * 65, 7, ["a"]])
def test_a_bad_ref_is_refused_naming_the_rule(server, ref):
    status, body = post(server.port, "/messages", {"text": "hi", "ref": ref})
    assert status == 400 and "ref must be a string of 1 to 64 characters" in body["errors"]["ref"]
    with joined(server) as (ws, _):
        ws.send(json.dumps({"type": "message", "text": "hi", "ref": ref}))
        assert receive(ws, "error")["error"] == "ref must be a string of 1 to 64 characters"
    assert get(server.port, "/messages")[1]["messages"] == []


def test_an_error_frame_carries_the_ref_of_the_message_it_refuses(server):
    with joined(server) as (ws, _):
        ws.send(json.dumps({"type": "message", "text": "x" * 2001, "ref": "too-long"}))
        assert receive(ws, "error")["ref"] == "too-long"


def test_a_ref_is_forgotten_with_its_message(small_server):
    post(small_server.port, "/messages", {"text": "old", "ref": "r"})
    for n in range(3):  # the room keeps 3: "old" and its ref are gone
        post(small_server.port, "/messages", {"text": f"new {n}"})
    assert post(small_server.port, "/messages", {"text": "again", "ref": "r"})[0] == 201
    assert len(the_room().history.refs) == 1
