"""Names belong to people: a name held online at another address is refused, one address may
share its name between its tabs, and names that garble or hide are refused naming the rule.
"""

import socket
import unicodedata

import pytest
from websockets.sync.client import connect

from tests.helpers import (
    all_changes,
    get,
    joined,
    post,
    presence_frames,
    receive,
    rename,
    server_waits_for_a_client,
    stored_texts,
    wait_for_health,
    wait_until,
    ws_url,
)


def test_two_people_may_share_a_name_and_each_is_counted(server):
    with joined(server, name="watcher") as (watcher, _):
        receive(watcher, "presence")  # its own join
        with joined(server, name="sam") as (first, _), joined(server, name="sam") as (second, _):
            assert all_changes(presence_frames(watcher, 2)) == [{"joined": "sam"}] * 2
            assert get(server.port, "/health")[1]["clients"] == 3
            first.close()
            assert receive(watcher, "presence")["changes"] == [{"left": "sam"}]
            second.send("still here")
            assert receive(watcher, "message")["name"] == "sam"


def test_a_name_with_control_characters_in_the_url_gets_an_error_and_a_guest_name(server):
    with joined(server, name="a\nb") as (ws, history):
        assert history["name"].startswith("guest-")
        assert "control characters" in receive(ws, "error")["error"]


def test_a_name_held_online_at_another_address_is_refused_on_join_naming_it(server):
    with (
        joined(server, "127.0.0.1", name="bob"),
        joined(server, "127.0.0.2", name="Bob") as (ws, history),
    ):
        assert history["name"].startswith("guest-")
        assert "'Bob' is taken" in receive(ws, "error")["error"]


def test_one_address_may_share_a_name_between_its_tabs(server):
    with (
        joined(server, "127.0.0.3", name="bob"),
        joined(server, "127.0.0.3", name="bob") as (ws, history),
    ):
        assert history["name"] == "bob"
        ws.send("hi")
        assert receive(ws, "message")["name"] == "bob"


def test_a_rename_to_a_name_held_at_another_address_is_refused_with_the_name_kept(server):
    with (
        joined(server, "127.0.0.1", name="bob"),
        joined(server, "127.0.0.2", name="carol") as (ws, _),
    ):
        rename(ws, "BOB")
        error = receive(ws, "error")
        assert error["error"].startswith("rename refused: ") and "'BOB' is taken" in error["error"]
        assert error["name"] == "carol"
        ws.send("still carol")
        assert receive(ws, "message")["name"] == "carol"


def test_a_name_is_free_again_once_its_holder_left(server):
    with joined(server, "127.0.0.1", name="bob"):
        pass
    wait_for_health(server.port, clients=0)  # the server has seen bob go, not only bob's close
    with joined(server, "127.0.0.2", name="bob") as (_, history):
        assert history["name"] == "bob"


def test_an_http_post_under_a_name_held_online_at_another_address_is_a_409(server):
    with joined(server, "127.0.0.2", name="bob"):
        status, body = post(server.port, "/messages", {"name": "bob", "text": "hi"})
        assert status == 409 and "'bob' is taken" in body["errors"]["name"]
        assert (
            post(server.port, "/messages", {"name": "bob", "text": "me"}, source="127.0.0.2")[0]
            == 201
        )
    assert stored_texts(server.port) == ["me"]


def test_a_name_is_held_from_the_handshake_while_its_history_still_comes(big_room):
    sock = socket.socket()  # bob resumes 16 MB of history, and reads none of it yet
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", big_room.ws_port))
    url = ws_url(big_room, name="bob", since=0)
    with connect(url, sock=sock, open_timeout=5, close_timeout=1, max_queue=1):
        wait_until(lambda: server_waits_for_a_client(big_room), what="bob's history waiting")
        with joined(big_room, "127.0.0.2", name="bob") as (ws, history):
            assert history["name"].startswith("guest-")
            assert "'bob' is taken" in receive(ws, "error")["error"]


@pytest.mark.parametrize(
    "name, rule",
    [
        ("\u202eevil", "format character (U+202E"),  # right-to-left override
        ("ali\u2066ce", "format character (U+2066"),  # a bidi isolate
        ("\u200b", "format character (U+200B"),  # zero width space
        ("\u200dbob", "format character (U+200D"),  # a joiner outside a word
        ("bob\u3164", "(U+3164, HANGUL FILLER)"),  # a Hangul filler: "bob" to the eye
        (" \u0301\u0302 ", "begins with a combining mark"),  # marks with no letter
        ("x" + "\u0301\u0302\u0303\u0304\u0305", "more than 4 combining marks in a row"),
        ("a" + "\u0300" * 31, "the same mark twice in a row"),
        ("bo\u2028b", "control characters"),  # a line separator
    ],
)
def test_names_that_garble_or_hide_are_refused_naming_the_rule(server, name, rule):
    status, body = post(server.port, "/messages", {"name": name, "text": "hi"})
    assert status == 400 and rule in body["errors"]["name"]
    with joined(server, name="kept") as (ws, _):
        rename(ws, name)
        error = receive(ws, "error")
        assert error["error"].startswith("rename refused: ") and rule in error["error"]
        assert error["name"] == "kept"
    with joined(server, name=name) as (ws, history):
        assert history["name"].startswith("guest-") and rule in receive(ws, "error")["error"]


@pytest.mark.parametrize(
    "name",
    [
        "Nguye\u0302\u0303n",  # Vietnamese, typed as marks: stored composed (NFC), "Nguyễn"
        "أحمد",
        "می\u200cخواهم",  # Persian: a zero width non-joiner inside the word
        "👩\u200d💻",  # an emoji sequence: a zero width joiner between two emoji
        "🏳\ufe0f\u200d🌈",
        "שָּׁלוֹם",  # pointed Hebrew: three marks on one letter
        "1\ufe0f\u20e3",  # a keycap emoji: two marks
    ],
)
def test_names_of_real_writing_and_emoji_are_accepted(server, name):
    status, message = post(server.port, "/messages", {"name": name, "text": "hi"})
    assert status == 201 and message["name"] == unicodedata.normalize("NFC", name)
