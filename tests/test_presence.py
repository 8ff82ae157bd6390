"""Presence reads right: changes within one interval are coalesced into what they add up to,
while the history's list of who is online stays exact.
"""

import contextlib
import json

from parts import presence

# isort: split
import pytest

from tests.helpers import (
    BURST,
    all_changes,
    joined,
    presence_changes,
    presence_frames,
    receive,
    rename,
    the_room,
    wait_for_health,
)


def test_a_presence_frame_for_several_changes_carries_them_only_in_changes(server):
    with contextlib.ExitStack() as stack:
        watcher, _ = stack.enter_context(joined(server, name="watcher"))
        renamers = [stack.enter_context(joined(server, name=f"a{n}"))[0] for n in range(3)]
        presence_frames(watcher, 4)  # the joins
        for n, renamer in enumerate(renamers):  # at once: the 2nd and 3rd wait for the next window
            renamer.send(json.dumps({"type": "name", "name": f"b{n}"}))
        frames = presence_frames(watcher, 3)
    assert sorted(change["renamed"]["to"] for change in all_changes(frames)) == ["b0", "b1", "b2"]
    for frame in frames:
        if len(frame["changes"]) == 1:
            assert frame["renamed"] == frame["changes"][0]["renamed"]  # one change: also at the top
        else:
            assert not {"joined", "left", "renamed"} & frame.keys()
    assert any(len(frame["changes"]) > 1 for frame in frames)


@pytest.fixture
def slow_presence(server, monkeypatch):
    """An interval of an hour, which the test ends itself (send_presence_now): what happens in
    one interval does not depend on the machine's speed."""
    monkeypatch.setattr(presence, "PRESENCE_EVERY", 3600)
    return server


def send_presence_now(servers):
    """The end of the interval: the changes waiting go out."""
    servers.loop.call_soon_threadsafe(the_room().presence.send_presence)


def synced(ws):
    """Returns once the server has acted on every frame this client sent before (in order)."""
    ws.send(json.dumps({"type": "ping"}))
    receive(ws, "pong")


@contextlib.contextmanager
def watching(servers):
    """A client whose own join (and any before it) has gone out: a new interval begins."""
    with joined(servers, name="watcher") as (watcher, _):
        send_presence_now(servers)
        presence_changes(watcher, until=lambda changes: {"joined": "watcher"} in changes)
        yield watcher


def changes_until_joined(watcher, name):
    return presence_changes(watcher, until=lambda changes: {"joined": name} in changes)


def test_a_join_then_a_rename_in_one_interval_is_one_join_under_the_new_name(slow_presence):
    with watching(slow_presence) as watcher, joined(slow_presence) as (newcomer, _):
        rename(newcomer, "alice")
        synced(newcomer)
        send_presence_now(slow_presence)
        frame = receive(watcher, "presence")
    assert frame == {"type": "presence", "joined": "alice", "changes": [{"joined": "alice"}]}


def test_a_join_then_a_leave_in_one_interval_is_nothing(slow_presence):
    with watching(slow_presence) as watcher:
        with joined(slow_presence, name="ghost"):
            pass
        wait_for_health(slow_presence.port, clients=1)  # the ghost has gone
        send_presence_now(slow_presence)
        with joined(slow_presence, name="marker"):
            send_presence_now(slow_presence)
            assert receive(watcher, "presence")["changes"] == [{"joined": "marker"}]


def test_renames_in_one_interval_are_one_rename(slow_presence):
    with joined(slow_presence, name="a") as (a, _), watching(slow_presence) as watcher:
        for n in range(1, BURST):  # as many as one client may: the others hear of one
            rename(a, f"a{n}")
        synced(a)
        send_presence_now(slow_presence)
        frame = receive(watcher, "presence")
    assert frame["changes"] == [{"renamed": {"from": "a", "to": f"a{BURST - 1}"}}]


def test_a_rename_then_a_leave_in_one_interval_is_a_leave_under_the_old_name(slow_presence):
    with joined(slow_presence, name="a") as (a, _), watching(slow_presence) as watcher:
        rename(a, "b")
        synced(a)
        a.close()
        wait_for_health(slow_presence.port, clients=1)
        send_presence_now(slow_presence)
        frame = receive(watcher, "presence")
    assert frame["changes"] == [{"left": "a"}]


def test_a_rename_to_the_same_name_is_no_change(server):
    with joined(server, name="a") as (a, _), watching(server) as watcher:
        rename(a, "a")
        with joined(server, name="marker"):
            assert changes_until_joined(watcher, "marker") == [{"joined": "marker"}]


def test_online_in_history_stays_exact_while_changes_are_coalesced(slow_presence):
    with watching(slow_presence) as watcher, joined(slow_presence) as (newcomer, _):
        rename(newcomer, "alice")
        synced(newcomer)
        with joined(slow_presence, name="late") as (late, history):
            send_presence_now(slow_presence)
            changes = changes_until_joined(late, "late")
            assert changes_until_joined(watcher, "late") == changes
    assert changes == [{"joined": "alice"}, {"joined": "late"}]
    assert sorted(history["online"] + [change["joined"] for change in changes]) == [
        "alice",
        "late",
        "watcher",
    ]
