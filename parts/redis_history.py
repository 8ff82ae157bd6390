"""The history in Redis (--redis URL), so that several chat.py processes are one chat room.

    python chat.py --redis redis://127.0.0.1:6379/0 --port 8000 --ws-port 8765
    python chat.py --redis redis://127.0.0.1:6379/0 --port 8001 --ws-port 8766

chat.py imports this module only when --redis is given: the default chat needs neither Redis
nor its client. RedisHistory is the in-process list with one difference: add() stores the
message in Redis instead of keeping it. Redis then publishes it to every process, and each
keeps it and delivers it to its own clients with the same History.deliver() that the single
process uses. So everything else (history on join, `since`, GET /messages) works unchanged,
from a local copy of the history that every process keeps in the same order.

Order: a Lua script takes the next id (INCR), keeps the message (RPUSH, LTRIM) and
publishes it (PUBLISH) in one step that Redis runs atomically, so messages are published
in id order. One task per process reads the subscription and delivers in that order;
after a gap (Redis was away, or a reconnect), it first delivers what it missed from the
list. If Redis comes back without its data, ids go on from where this process was, so no
id is used twice. Presence (who is online) and guest numbers are per process.

A message's `ref` is looked up and kept in the same script (a hash from ref to message,
pruned with the list), so a message sent again to another process is still stored once.
Guarantees: those of every history (parts/history.py), across processes; Redis away is a
RoomUnavailable (a 503, or an error frame with retry_after), never a lost or doubled message.
"""

import asyncio
import contextlib
import json

import redis.asyncio as redis

from parts.errors import RoomUnavailable
from parts.history import History

ROOM_ID, LAST_ID, MESSAGES, CHANNEL = "chat:room", "chat:last_id", "chat:messages", "chat:messages"
REFS = "chat:refs"

# KEYS: LAST_ID, MESSAGES, CHANNEL, ROOM_ID, REFS; ARGV: the message's JSON before and after
# its id, how many messages to keep, and its ref ("" for none). Returns {1, the stored
# message}, {0, the message stored before with this ref}, or nil if Redis lost the room.
STORE_AND_PUBLISH = """
if redis.call('EXISTS', KEYS[4]) == 0 then
    return false
end
if ARGV[4] ~= '' then
    local stored = redis.call('HGET', KEYS[5], ARGV[4])
    if stored then
        return {0, stored}
    end
end
local id = redis.call('INCR', KEYS[1])
local message = ARGV[1] .. id .. ARGV[2]
redis.call('RPUSH', KEYS[2], message)
if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[5], ARGV[4], message)
end
while redis.call('LLEN', KEYS[2]) > tonumber(ARGV[3]) do
    local ref = cjson.decode(redis.call('LPOP', KEYS[2]))['ref']
    if ref then
        redis.call('HDEL', KEYS[5], ref)
    end
end
redis.call('PUBLISH', KEYS[3], message)
return {1, message}
"""

RESTORE = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[2]) then
    redis.call('SET', KEYS[2], ARGV[2])
end
return redis.call('GET', KEYS[1])
"""


class RedisHistory(History):
    """The in-process list, stored in Redis first and kept here when Redis publishes it."""

    def __init__(self, url, history):
        super().__init__(history)
        self.url = url
        self.history_size = history
        self.redis = redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        self.store_and_publish = self.redis.register_script(STORE_AND_PUBLISH)
        self.restore_script = self.redis.register_script(RESTORE)
        self.pubsub = self.redis.pubsub()
        self.listener = None

    async def open(self, send_to_all):
        """Started, or RoomUnavailable if Redis cannot be reached; guests are per process."""
        await super().open(send_to_all)
        try:
            await self.start()
        except (redis.RedisError, OSError) as error:
            await self.close()
            raise RoomUnavailable(f"cannot reach Redis at {self.url}: {error}") from None
        return 0

    async def start(self):
        """Subscribe first, then load the kept messages: nothing can fall in between."""
        await self.connect()
        self.listener = asyncio.create_task(self.listen())

    async def connect(self):
        await self.restore()
        await self.pubsub.subscribe(CHANNEL)
        await self.catch_up()

    async def restore(self):
        """Name the room if no process did yet; if Redis lost its data, go on from our ids."""
        room_id = await self.restore_script(
            keys=[ROOM_ID, LAST_ID], args=[self.room_id, self.last_id]
        )
        self.room_id = room_id.decode()

    async def add(self, message):
        """Store in Redis; the message reaches everyone here when Redis publishes it.

        Returns the stored message and True, or for a repeated ref the one stored before and False.
        """
        ref = message.get("ref")
        before, after = json.dumps(message, ensure_ascii=False).split('"id": null', 1)
        try:
            for _ in range(2):
                stored = await self.store_and_publish(
                    keys=[LAST_ID, MESSAGES, CHANNEL, ROOM_ID, REFS],
                    args=[before + '"id": ', after, self.history_size, ref or ""],
                )
                if stored is not None:
                    stored_now, stored_message = stored
                    return json.loads(stored_message), stored_now == 1
                await self.restore()  # the room's keys are gone: Redis restarted without its data
        except (redis.RedisError, OSError):
            pass
        raise RoomUnavailable("the chat cannot store messages right now: try again soon")

    async def listen(self):
        """Deliver what Redis publishes, in id order.

        A publish missed while the connection was down (redis-py reconnects by itself)
        shows as a gap at the next message, or, when none follows, at the next check of
        the last id, once a second while nothing comes.
        """
        while True:
            try:
                item = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if item:
                    await self.receive(json.loads(item["data"]))
                elif int(await self.redis.get(LAST_ID) or 0) > self.last_id:
                    await self.catch_up()
            except (redis.RedisError, OSError):
                await asyncio.sleep(0.5)
                with contextlib.suppress(redis.RedisError, OSError):
                    await self.connect()

    async def receive(self, message):
        if message["id"] > self.last_id + 1:
            await self.catch_up()  # a gap: what came in between is in the list
        if message["id"] > self.last_id:  # else: delivered already, by catch_up()
            self.deliver(message)

    async def catch_up(self):
        """Deliver every kept message newer than the last one delivered here."""
        for raw in await self.redis.lrange(MESSAGES, 0, -1):
            message = json.loads(raw)
            if message["id"] > self.last_id:
                self.deliver(message)

    async def healthy(self):
        try:
            await self.redis.ping()
        except (redis.RedisError, OSError):
            return False
        return True

    async def close(self):
        if self.listener:
            self.listener.cancel()
        await self.pubsub.aclose()
        await self.redis.aclose()
