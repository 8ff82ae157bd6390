"""The page when the server behind it restarts, or another one takes its ports: every message
posted afterwards shows in every page, and the page says that the room began again.

A step without a room id (steps/step4_hug.py), a step with one (steps/step5_restarts.py) and
chat.py serve the same chat.html: with pages open in Chromium, each is stopped and started
again, or replaced by another on the same ports.
"""

import pytest
from playwright.sync_api import expect

from tests.helpers import ROOT, ChatProcess, free_port, post, say, texts

STEP = "step4_hug.py"  # serves chat.html and gives no room id
STEP_WITH_ROOM_ID = "step5_restarts.py"
RESTARTED = "The server restarted: a new room begins here."


class Step(ChatProcess):
    """`python steps/STEP ARGS`, as an attendee starts it."""

    def __init__(self, step, *args):
        self.script = ROOT / "steps" / step
        super().__init__(*args)


@pytest.fixture
def servers():
    """Starts chat.py or a step on the given ports; stops whatever is still running at the end."""
    started = []

    def start(script, ports):
        options = ["--port", str(ports[0]), "--ws-port", str(ports[1])]
        server = Step(script, *options) if script.startswith("step") else ChatProcess(*options)
        started.append(server)
        server.urls()
        return server

    yield start
    for server in started:
        server.stop()


def stop(server):
    """Ctrl+C for a step, as in a workshop; chat.py stops the same way."""
    server.process.send_signal(2)  # SIGINT
    assert server.process.wait(10) == 0


def chat_between(alice, bob, *words, before=()):
    """Alice says the first word and Bob the second; both pages show both, after `before`."""
    say(alice, words[0])
    expect(texts(bob)).to_have_text([*before, words[0]])
    say(bob, words[1])
    for page in (alice, bob):
        expect(texts(page)).to_have_text([*before, *words])


def restarted_notices(page):
    return page.locator("#chat-box .notice", has_text=RESTARTED)


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (STEP, STEP),
        (STEP_WITH_ROOM_ID, STEP_WITH_ROOM_ID),
        (STEP, "chat.py"),
        ("chat.py", STEP),
        ("chat.py", "chat.py"),
    ],
    ids=[
        "a step restarted",
        "a step with a room id restarted",
        "a step replaced by chat.py",
        "chat.py replaced by a step",
        "chat.py restarted",
    ],
)
def test_pages_show_every_message_after_the_server_restarts_or_changes(
    servers,
    open_page,
    first,
    then,
):
    ports = (free_port(), free_port())
    server = servers(first, ports)
    alice, bob = open_page(server.port, "alice"), open_page(server.port, "bob")
    old = ["old 1 from alice", "old 2 from bob"]
    chat_between(alice, bob, *old)
    say(alice, "old 3 from alice")  # three, so the new server's ids 1 to 3 were all seen
    old.append("old 3 from alice")
    for page in (alice, bob):
        expect(texts(page)).to_have_text(old)

    stop(server)
    servers(then, ports)
    chat_between(alice, bob, "new 1 from alice", "new 2 from bob", before=old)
    chat_between(
        alice,
        bob,
        "new 3 from alice",
        "new 4 from bob",
        before=[*old, "new 1 from alice", "new 2 from bob"],
    )
    for page in (alice, bob):
        expect(restarted_notices(page)).to_have_count(1)
        expect(page.locator("#status")).to_have_text("online")


def test_a_page_away_while_a_step_restarted_and_got_more_messages_shows_them_all(
    servers,
    open_page,
):
    # Without a room id, only the messages tell: the new run's history reaches past the
    # newest id the page showed, but its id 1 is another message than the old run's id 1.
    ports = (free_port(), free_port())
    server = servers(STEP, ports)
    alice = open_page(server.port, "alice")
    for text in ["old 1", "old 2"]:
        post(server.port, "/messages", {"name": "bob", "text": text})
    expect(texts(alice)).to_have_text(["old 1", "old 2"])

    alice.context.set_offline(True)
    expect(alice.locator("#status")).to_have_text("reconnecting…")
    stop(server)
    server = servers(STEP, ports)
    new = [f"new {n}" for n in range(1, 5)]
    for text in new:
        post(server.port, "/messages", {"name": "bob", "text": text})
    alice.context.set_offline(False)

    expect(texts(alice)).to_have_text(["old 1", "old 2", *new])
    expect(restarted_notices(alice)).to_have_count(1)
    expect(alice.locator("#status")).to_have_text("online")
