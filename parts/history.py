"""The room's history: the one interface the Room holds, and the default, the in-process list.

Three histories answer to it: History (this module: the messages in this process, gone at a
restart), SqliteHistory (--store: in a file too, over restarts) and RedisHistory (--redis: in
Redis, shared by several processes). The Room calls, only from its event loop:

    guests = await history.open(send_to_all)  once, before any client comes
    history.keep_guest_count(guests)  each time the room gives a guest number
    await history.guest_count_kept()  before a client gets its history (and its guest name)
    message, stored_now = await history.add(message)
    history.messages_since(since, limit)  kept messages after `since`, from memory, at once
    history.room_id, history.last_id, history.messages
    await history.healthy(), await history.close()

Guarantees, for all three: ids only grow, and no id is given twice; every stored message is
kept here and handed to `send_to_all` exactly once, in id order, so every client sees the same
messages in the same order; a message whose `ref` the history still keeps is not stored again:
add() returns the one stored before, and False. messages_since() copies only what it returns.
The guest count reaches the history only through keep_guest_count(): a history that outlives
the process (--store) has it kept before guest_count_kept() returns and before a later add()
stores a message, so no restart gives a guest number twice.
"""

import bisect
import collections
import operator
import secrets

HISTORY_ON_CONNECT = 50  # messages a client gets on connect without since=


class History:
    """The last `size` messages in this process's memory, with their refs: the default history.

    SqliteHistory and RedisHistory keep this list too, as the copy they serve clients from;
    they differ in add(), which stores a message elsewhere first and keeps it here once stored.
    """

    def __init__(self, size):
        self.room_id = secrets.token_hex(8)  # new on restart: tells clients that ids began again
        self.messages = collections.deque(maxlen=size)
        self.refs = {}  # ref -> the kept message that carries it
        self.last_id = 0
        self.send_to_all = None  # the room's: sends a message to everyone connected here

    async def open(self, send_to_all):
        """Before the room takes clients: remember how to reach the clients; returns the guest count kept
        over a restart (none here)."""
        self.send_to_all = send_to_all
        return 0

    def keep_guest_count(self, guests):
        """The room gave a guest number: `guests` so far. Kept only by a history that outlives
        the process; here numbers start again with it."""

    async def guest_count_kept(self):
        """Returns once the count last given to keep_guest_count() would survive a restart
        (at once here)."""

    async def add(self, message):
        """Give a message made by Room.post() its id, keep it and deliver it; returns it and True.

        A `ref` still kept means the client sent this message before (its connection dropped
        before the answer came): returns the stored one and False, and stores nothing.
        """
        ref = message.get("ref")
        if ref in self.refs:
            return self.refs[ref], False
        message["id"] = self.last_id + 1
        return self.deliver(message), True

    def deliver(self, message):
        """Keep a message and send it to everyone connected here, in id order."""
        if len(self.messages) == self.messages.maxlen:  # the oldest is dropped: so is its ref
            self.refs.pop(self.messages[0].get("ref"), None)
        if "ref" in message:
            self.refs[message["ref"]] = message
        self.last_id = message["id"]
        self.messages.append(message)
        self.send_to_all(message)
        return message

    def messages_since(self, since=None, limit=None):
        """Kept messages with an id greater than `since`, oldest first; the last 50 without it.

        Ids only grow, so bisection finds the first one, and only what is returned is copied:
        a room that keeps 100,000 messages answers as fast as one that keeps 100.
        """
        if since is None:
            start = max(0, len(self.messages) - HISTORY_ON_CONNECT)
        else:
            start = bisect.bisect_right(self.messages, since, key=operator.itemgetter("id"))
        stop = len(self.messages) if limit is None else min(len(self.messages), start + limit)
        return [self.messages[i] for i in range(start, stop)]

    async def healthy(self):
        """Whether the history can store messages now (always, here)."""
        return True

    async def close(self):
        """Nothing to let go of here; the others end their thread or their connections."""
