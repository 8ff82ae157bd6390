"""Who is online, told to everyone in batches: only the changes, one change per connection.

Guarantees: at most one presence frame every PRESENCE_EVERY seconds; what one connection did
meanwhile is one change (a join then a leave is none, a join then a rename a join under the new
name); `online` is the room as the frames sent so far tell it, so a history frame that lists it
and the frames still to come add up, each change counted once. Only the room's event loop
calls it.
"""

import collections
import itertools

PRESENCE_EVERY = 0.25  # seconds; at most one presence frame this often


class Presence:
    """Who is online, as the room tells everyone: only the changes, at most one frame every
    PRESENCE_EVERY, one change per connection (see presence_changed())."""

    def __init__(self, loop, send_to_all):
        self.loop, self.send_to_all = loop, send_to_all  # the room's
        # name -> connections, as the presence frames sent so far told it
        self.online = collections.Counter()
        self.presence_changes = {}  # connection -> (name before, name now) not yet sent
        self.presence_due = False  # a presence frame is on its way
        self.presence_sent = 0.0  # loop time of the last presence frame

    def presence_changed(self, connection, before, after):
        """Send presence on the loop's next turn, or with the next changes if a frame went out
        less than PRESENCE_EVERY ago.

        Each frame goes to everyone: a frame per join would cost the square of the room's
        size, and filling a room of 1000 would take seconds. What one connection does in
        the meantime is one change, from the name the others last heard to its name now:
        a join then a rename is a join under the new name, a join then a leave is nothing.
        """
        if connection in self.presence_changes:  # its earlier change is not sent yet
            before = self.presence_changes[connection][0]
        self.presence_changes[connection] = (before, after)
        if not self.presence_due:
            self.presence_due = True
            wait = self.presence_sent + PRESENCE_EVERY - self.loop.time()
            self.loop.call_later(max(0, wait), self.send_presence)

    def send_presence(self):
        """Only what changed: the whole online list is in each client's history frame.

        A frame that listed everyone let one client renaming 9 times a second make the
        server send 114 MB/s to a room of 900.
        """
        pending, self.presence_changes, self.presence_due = self.presence_changes, {}, False
        changes = [
            change for change in itertools.starmap(self.presence_change, pending.values()) if change
        ]
        if not changes:  # say, a join and a leave: nobody needs to hear of it
            return
        self.presence_sent = self.loop.time()
        frame = {"type": "presence", "changes": changes}
        if len(changes) == 1:
            frame.update(changes[0])  # one change: {"joined": "bob"}, as the contract shows
        self.send_to_all(frame)
        for change in changes:
            self.count_online(change)

    @staticmethod
    def presence_change(before, after):
        """One connection's change as a presence frame tells it (None for no change at all)."""
        if before == after:  # a join then a leave, or a rename and back
            return None
        if before is None:
            return {"joined": after}
        if after is None:
            return {"left": before}
        return {"renamed": {"from": before, "to": after}}

    def count_online(self, change):
        """Keep `online` as the presence frames sent so far tell it (see history_frame())."""
        if "renamed" in change:
            change = {"left": change["renamed"]["from"], "joined": change["renamed"]["to"]}
        if "left" in change:
            self.online[change["left"]] -= 1
            if not self.online[change["left"]]:
                del self.online[change["left"]]
        if "joined" in change:
            self.online[change["joined"]] += 1
