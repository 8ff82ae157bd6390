"""The history in an SQLite file too (--store FILE): a restart keeps the room.

Guarantees: ids, the room id, the guest count, the kept messages and their refs survive a
restart, however the process ends (kill -9 too; a power cut may lose the last ones, see
HistoryFile); a message is delivered, and its 201 sent, only once it is in the file, so a crash
loses only messages nobody was told were stored; a guest count is in the file before the guest
gets the history or the message that shows the name, so no restart gives a guest number twice;
the event loop never waits for the disk; one file is used by one chat.py at a time. A file the
chat cannot keep (in use, damaged, not a database, not writable) is a RoomUnavailable at start
with a one-line reason that says what to do; what fails later is logged, once per interval
(parts/logs.py), never swallowed.
"""

import asyncio
import logging
import os
import queue
import re
import sqlite3
import threading

from parts.errors import RoomUnavailable
from parts.history import History

log = logging.getLogger("chat")


class SqliteHistory(History):
    """The in-process list, kept in an SQLite file too.

    Clients are still served from the list in memory. The file is written by a thread of
    its own (HistoryFile), so the event loop never waits for the disk; a message is
    delivered, and its 201 sent, once that thread has it on disk. So a crash loses only
    messages nobody was told were stored (the page sends them again, with their ref). Ids
    are given here, in the loop, and the thread writes in that order and answers in it.
    """

    def __init__(self, size, path):
        super().__init__(size)
        self.file = HistoryFile(path, size, self.on_disk)
        self.writing = {}  # ref -> the future of its message, on its way to the disk

    async def open(self, send_to_all):
        """The file's room id, guest count and messages; a new file takes this room's."""
        await super().open(send_to_all)
        self.loop = asyncio.get_running_loop()
        self.room_id, guests, kept = self.file.open(self.room_id)
        for message in kept:
            self.deliver(message)  # to nobody yet: it keeps the message and its ref
        self.next_id = self.last_id + 1  # given to the next post; last_id is the last delivered
        self.guest_count_on_disk = self.loop.create_future()  # the last count given is on disk
        self.guest_count_on_disk.set_result(None)
        return guests

    def keep_guest_count(self, guests):
        """History.keep_guest_count(): to the file, in order with the messages, so a post by
        a new guest is written after its count."""
        self.guest_count_on_disk = self.loop.create_future()
        self.file.write_guest_count(guests, (None, self.guest_count_on_disk))

    async def guest_count_kept(self):
        """Once the count last given is on disk (a commit: a fraction of a millisecond, shared
        by the joins that come meanwhile)."""
        await asyncio.shield(self.guest_count_on_disk)

    async def add(self, message):
        """History.add(), delivering once the message is on disk."""
        ref = message.get("ref")
        if ref in self.refs:
            return self.refs[ref], False
        if ref is not None and ref in self.writing:  # sent again before the first was on disk
            return await asyncio.shield(self.writing[ref]), False
        message["id"] = self.next_id
        self.next_id += 1
        written = self.loop.create_future()
        if ref is not None:
            self.writing[ref] = written
        self.file.write(message, (message, written))
        return await asyncio.shield(written), True  # shield: the delivery happens regardless

    def on_disk(self, written, error):
        """Called by the writer thread with what it wrote, in id order; delivers in the loop,
        in the same order."""
        self.loop.call_soon_threadsafe(self.deliver_written, written, error)

    def deliver_written(self, written, error):
        if error:
            log.error("--store: cannot write messages: %s", error)
        for message, answer in written:
            if message is None:  # a guest count: the writer logged its failure, if any
                answer.set_result(None)
                continue
            self.writing.pop(message.get("ref"), None)  # from now on, self.refs has it
            if error:
                answer.set_exception(
                    RoomUnavailable("the chat cannot store messages right now: try again soon")
                )
            else:
                answer.set_result(self.deliver(message))

    async def close(self):
        """Waits for the writes under way: the servers stopped first, so no post comes."""
        self.file.close()


class HistoryFile:
    """The kept messages in an SQLite file, written by one thread, in order.

    Whatever waits when the thread is ready is written in one transaction. WAL with
    synchronous=NORMAL: a committed transaction is in the file, so it survives the chat's
    process however it ends (kill -9 too); it reaches the disk itself at the next checkpoint,
    so a power cut or a crash of the whole machine may lose the last ones. synchronous=FULL
    would wait for the disk (fsync) at every commit: here 1.3 ms at the median but 86 ms at
    the 99th percentile, and every message would wait for that before it is delivered.
    The file keeps --history messages, like the room (and up to TRIM_EVERY more between
    trims); an exclusive lock keeps a second chat.py from writing it too.
    """

    BATCH = 1000  # messages at most in one INSERT (SQLite takes up to 32,766 values)
    # Seconds to wait for the file's lock at start. Two chats started at once may both read
    # the new file before either writes: the one that then gets the lock must wait for the
    # other to let go (SQLite makes the other give up at once, as both would wait forever),
    # or both say "in use". A chat started while another runs says it after this wait.
    LOCK_WAIT = 1
    TRIM_EVERY = 100  # messages: the file holds up to --history + 100 between trims
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS room (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS messages (
            id INTEGER PRIMARY KEY, name TEXT NOT NULL, text TEXT NOT NULL, ts TEXT NOT NULL,
            ref TEXT
        );
    """

    def __init__(self, path, history, on_written):
        self.path, self.history = path, history
        self.on_written = on_written  # called by the writer with [what write() had], error
        # (message, None, what to hand back) or (None, guest count, ...); None to stop
        self.waiting = queue.SimpleQueue()
        self.writer = threading.Thread(target=self.write_all, name="store")

    def open(self, new_room_id):
        """The room id (new_room_id for a new file), the guest count, the kept messages."""
        try:
            self.db = sqlite3.connect(
                self.path, timeout=self.LOCK_WAIT, isolation_level=None, check_same_thread=False
            )
            for pragma in (
                "locking_mode = EXCLUSIVE",
                "journal_mode = WAL",
                "synchronous = NORMAL",
            ):
                self.db.execute(f"PRAGMA {pragma}")
            # Reading only the newest messages would not see a damaged page among the old
            # ones, and every trim would then fail: the file would grow without bound. The
            # file holds about --history messages: 3 ms for 1000 of 2000 characters.
            damage = self.db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if damage != "ok":
                where = damage.splitlines()[-1]  # after "*** in database main ***"
                raise sqlite3.DatabaseError(f"database disk image is malformed: {where}")
            self.db.executescript(self.SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO room VALUES ('id', ?)", (new_room_id,))
            room = dict(self.db.execute("SELECT key, value FROM room"))
            guests = str(room.get("guests", 0))
            if not re.fullmatch(r"[0-9]{1,15}", guests):  # the chat writes str() of a count
                raise sqlite3.DatabaseError(
                    f"database disk image is malformed: the guest count is {guests!r}"
                )
            rows = self.db.execute(
                "SELECT * FROM (SELECT id, name, text, ts, ref FROM messages"
                " ORDER BY id DESC LIMIT ?) ORDER BY id",
                (self.history,),
            ).fetchall()
        except sqlite3.Error as error:
            self.close()
            raise RoomUnavailable(
                f"cannot use --store {self.path}: {store_error(error, self.path)}"
            ) from None
        self.guests_written = int(guests)
        self.writer.start()
        return room["id"], self.guests_written, [stored_message(*row) for row in rows]

    def write(self, message, handle):
        """From the loop: write soon, then hand `handle` back to on_written() with the others
        of its batch, and None, or the error if it failed."""
        self.waiting.put((message, None, handle))

    def write_guest_count(self, guests, handle):
        """write(), for the room's guest count instead of a message."""
        self.waiting.put((None, guests, handle))

    def write_all(self):
        """The writer thread."""
        while True:
            batch = [self.waiting.get()]
            while len(batch) < self.BATCH and not self.waiting.empty():
                batch.append(self.waiting.get())
            stopping = batch[-1] is None  # close() comes after every write
            if stopping:
                batch.pop()
            if batch:
                error = self.write_batch(batch)
                self.on_written([handle for _, _, handle in batch], error)
            if stopping:
                return

    def write_batch(self, batch):
        """One INSERT of the whole batch, its own transaction; None, or the error that undid it.

        One statement, not BEGIN, INSERT, COMMIT: each lets go of Python's GIL and takes it
        back from the busy event loop, and on a loaded machine each of those hand-offs can
        cost the loop a time slice."""
        messages = [message for message, _, _ in batch if message is not None]
        counts = [guests for _, guests, _ in batch if guests is not None]
        rows = [(m["id"], m["name"], m["text"], m["ts"], m.get("ref")) for m in messages]
        try:
            if rows:
                self.db.execute(
                    "INSERT INTO messages VALUES " + ", ".join(["(?, ?, ?, ?, ?)"] * len(rows)),
                    [value for row in rows for value in row],
                )
        except sqlite3.Error as error:
            return error
        # The messages are kept: what follows can fail without refusing them, but not in silence.
        try:
            if messages and messages[-1]["id"] % self.TRIM_EVERY < len(messages):  # now and then
                # Ids have no gaps but after a failed write: this keeps --history at most.
                self.db.execute(
                    "DELETE FROM messages WHERE id <= ?", (messages[-1]["id"] - self.history,)
                )
        except sqlite3.Error as error:
            log.error(
                "--store: cannot delete the messages past --history, the file grows: %s", error
            )
        try:
            # Counts only grow; one that failed is written with the next batch.
            guests = counts[-1] if counts else self.guests_written
            if guests != self.guests_written:
                self.db.execute("INSERT OR REPLACE INTO room VALUES ('guests', ?)", (str(guests),))
                self.guests_written = guests
        except sqlite3.Error as error:
            log.error("--store: cannot write the guest count: %s", error)
        return None

    def close(self):
        if self.writer.is_alive():
            self.waiting.put(None)
            self.writer.join()  # the writes under way take milliseconds
        if hasattr(self, "db"):
            self.db.close()


def stored_message(id, name, text, ts, ref):
    """A row of the file as the message the room sends (the same keys, in the same order)."""
    message = {"type": "message", "id": id, "name": name, "text": text, "ts": ts}
    if ref is not None:
        message["ref"] = ref
    return message


def store_error(error, path):
    """Why the chat cannot use its --store file, and what to do about it."""
    if "locked" in str(error):
        return "it is in use (is another chat.py running with it?)"
    if "malformed" in str(error):
        return (
            f"it is damaged ({error}): move it away to start the room afresh, "
            "or put back a copy of it"
        )
    return f"{error}{permission_needed(path)}"


def permission_needed(path):
    """What the chat may not do but SQLite needs, as SQLite's errors do not say it: write the
    file, and create FILE-wal beside it (so write in its folder). os.access() also says no to
    root where root cannot: a read-only file system, an immutable file (chattr +i)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f": there is no folder {folder}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return (
            f": the chat needs write permission on the folder {folder}, where SQLite keeps "
            f"{os.path.basename(path)}-wal beside the file"
        )
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return f": the chat needs read and write permission on {path}"
    return ""
