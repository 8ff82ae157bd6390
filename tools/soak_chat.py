"""A fault soak: is anything lost when a part of the online chat fails?

    python tools/soak_chat.py --minutes 10          the run that docs/online.md reports
    python tools/soak_chat.py --seconds 15          a short one (the test suite runs this)

It runs what docs/online.md deploys: redis-server (append-only file), two `chat.py --redis`,
and nginx in front of them where it is installed (plain HTTP here: TLS changes nothing for
this). Clients type at random intervals, each message with its own `ref`, and behave as the
page does: one message on its way at a time, sent again with the same ref after a dropped
connection or an error that says `retry_after`; a client whose connection drops comes back
with `since=` and `room=`. Meanwhile, at random intervals, a chat process is killed with
SIGKILL (and started again on its ports a moment later), or redis-server is killed with
SIGKILL and started again with its data (each at least once, however short the run).

At the end (the faults stop, everything is up, typing stops, what is pending is delivered)
it prints what was lost, duplicated or reordered: of what the clients typed, in the room;
and of what each client received. The exit status is 1 if any count is not 0.
"""

import argparse
import asyncio
import collections
import contextlib
import http.client
import json
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

CHAT_PY = Path(__file__).resolve().parent.parent / "chat.py"
HISTORY = 1_000_000  # the room keeps everything of the run: every ref stays known
# One room key for both processes, as docs/online.md gives them; clients send it as Bearer.
# (--key=KEY, not --key KEY: a random key may begin with "-".)
KEY = secrets.token_urlsafe(16)
AUTHORIZATION = {"Authorization": f"Bearer {KEY}"}


# --- The parts: redis-server, two chat.py, nginx ------------------------------------------


def free_port():
    """A free port below the kernel's ephemeral range: a part is started again on its ports
    after a kill, and meanwhile a client's reconnect could take a port from that range."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:  # not Linux: the kernel's choice
        low = None
    for port in random.sample(range(10_000, low), 100) if low else ():
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind(("127.0.0.1", port))
            return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(port, path="/health"):
    """The JSON that GET `path` answers on 127.0.0.1:`port`, or None if nothing answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path, headers=AUTHORIZATION)
        return json.loads(connection.getresponse().read())
    except (OSError, ValueError):
        return None
    finally:
        connection.close()


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


class Part:
    """A program of the deployment, started on fixed ports, that can be killed and started again."""

    def __init__(self, name, command, ready, log):
        self.name, self.command, self.ready, self.log = name, command, ready, log
        self.process = None

    def start(self):
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=self.log)
        wait_for(self.ready_or_gone, 30, f"{self.name} starting")
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited at start with {self.process.returncode}")

    def ready_or_gone(self):
        return self.process.poll() is not None or self.ready()

    def kill(self):
        self.process.kill()  # SIGKILL: no chance to close anything
        self.process.wait(10)
        self.process = None

    def stop(self):
        if self.process:
            self.process.terminate()
            self.process.wait(10)

    @property
    def running(self):
        return self.process is not None


def redis_part(directory, log):
    port = free_port()
    binary = shutil.which("redis-server")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    command += ["--appendonly", "yes", "--save", ""]
    part = Part("redis-server", command, lambda: listens(port), log)
    part.url = f"redis://127.0.0.1:{port}/0"
    return part


def listens(port):
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def chat_part(number, redis_url, public_url, log):
    port, ws_port = free_port(), free_port()
    command = [sys.executable, str(CHAT_PY), "--port", str(port), "--ws-port", str(ws_port)]
    command += ["--redis", redis_url, "--history", str(HISTORY), f"--key={KEY}"]
    if public_url:
        command += ["--public-url", public_url]
    part = Part(f"chat.py {number}", command, lambda: answers(port) is not None, log)
    part.port, part.ws_port = port, ws_port
    return part


NGINX_CONF = """error_log {d}/error.log;
pid {d}/nginx.pid;
events {{}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body; proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    # As deploy/nginx.conf, without TLS: any process can answer, the room is in Redis.
    upstream chat_http {{
        server 127.0.0.1:{http_a} max_fails=0; server 127.0.0.1:{http_b} max_fails=0;
    }}
    upstream chat_websocket {{
        server 127.0.0.1:{ws_a} max_fails=0; server 127.0.0.1:{ws_b} max_fails=0;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://chat_http;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
        location = /ws {{
            proxy_pass http://chat_websocket;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


def nginx_binary():
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def nginx_part(directory, port, chats, log):
    a, b = chats
    conf = NGINX_CONF.format(
        d=directory, port=port, http_a=a.port, http_b=b.port, ws_a=a.ws_port, ws_b=b.ws_port
    )
    (directory / "nginx.conf").write_text(conf)
    command = [nginx_binary(), "-p", str(directory), "-c", str(directory / "nginx.conf")]
    command += ["-e", str(directory / "error.log"), "-g", "daemon off;"]
    return Part("nginx", command, lambda: answers(port) is not None, log)


# --- The clients: they type, and behave as the page does ---------------------------------


class Client:
    def __init__(self, number, urls, rate):
        self.name = f"client-{number}"
        self.source = f"127.0.0.{10 + number}"  # each its own address, as people are
        self.urls, self.rate = urls, rate
        self.typed = []  # every text, in the order typed
        self.refs = set()  # the refs of the texts typed here
        self.queue = collections.deque()  # (ref, text) not stored yet, the oldest first
        self.arrivals = []  # (id, whether it is an own message sent again) as they came
        self.room, self.last_id = None, 0
        self.tries = self.retries = self.reconnects = self.refused = 0
        self.typing = True
        self.longest_away = 0.0  # seconds, from a dropped connection to the next one open

    async def type(self):
        while self.typing:
            self.typed.append(f"{self.name} {len(self.typed)}")
            self.queue.append((secrets.token_hex(12), self.typed[-1]))
            self.refs.add(self.queue[-1][0])
            await asyncio.sleep(random.expovariate(self.rate))

    async def run(self):
        """Connect, resume, send; after a drop, again, to the next URL, with a backoff."""
        failures, dropped = 0, None
        while True:
            url = self.urls[self.reconnects % len(self.urls)]
            query = f"name={self.name}&since={self.last_id}" + (
                f"&room={self.room}" if self.room else ""
            )
            try:
                async with connect(
                    f"{url}?{query}", open_timeout=5, close_timeout=1, max_queue=None,
                    local_addr=(self.source, 0), additional_headers=AUTHORIZATION,
                ) as ws:  # fmt: skip
                    if dropped is not None:
                        self.longest_away = max(self.longest_away, time.monotonic() - dropped)
                    failures, dropped = 0, None
                    await self.session(ws)
            except (OSError, TimeoutError, WebSocketException):
                pass
            dropped = dropped or time.monotonic()
            self.reconnects += 1
            failures += 1
            await asyncio.sleep(min(2, 0.05 * 2**failures) * random.uniform(0.5, 1))

    async def session(self, ws):
        in_flight, retry_at, synced = None, 0, False
        while True:
            if synced and self.queue and not in_flight and time.monotonic() >= retry_at:
                in_flight = self.queue[0]
                ref, text = in_flight
                await ws.send(json.dumps({"type": "message", "text": text, "ref": ref}))
            try:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 0.05))
            except TimeoutError:
                continue
            if frame["type"] == "history":
                self.room = frame["room"]
                for message in frame["messages"]:
                    in_flight = self.receive(message, in_flight)
                synced = not frame["more"]
            elif frame["type"] == "message":
                in_flight = self.receive(frame, in_flight)
            elif frame["type"] == "error" and in_flight and frame.get("ref") == in_flight[0]:
                in_flight = None
                if "retry_after" in frame:
                    self.retries += 1
                    self.tries += 1
                    backoff = min(5, 0.1 * 2**self.tries) * random.uniform(0.5, 1)
                    retry_at = time.monotonic() + max(frame["retry_after"], backoff)
                else:
                    self.refused += 1  # a refusal for good: nothing typed here gets one
                    self.queue.popleft()

    def receive(self, message, in_flight):
        """Keep a message once, as the page does; returns what is still in flight."""
        own_again = message["id"] <= self.last_id and message.get("ref") in self.refs
        self.arrivals.append((message["id"], own_again))
        if self.queue and message.get("ref") == self.queue[0][0]:
            self.queue.popleft()  # stored: the next one may go
            self.tries, in_flight = 0, None
        self.last_id = max(self.last_id, message["id"])
        return in_flight


# --- The soak ------------------------------------------------------------------------------


async def faults(chats, redis, every, counts, stopping):
    """A fault at random intervals around `every` seconds: kill -9 of a chat process (started
    again on its ports a moment later), then kill -9 of redis-server (started again with its
    data), and so on."""
    kinds = ["chat", "redis"]
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), random.uniform(0.5, 1.5) * every)
        if stopping.is_set():
            return
        kind = kinds[sum(counts.values()) % 2]
        part = chats[counts["chat"] % 2] if kind == "chat" else redis  # each in turn
        await asyncio.to_thread(part.kill)
        counts[kind] += 1
        await asyncio.sleep(random.uniform(0.5, 3))
        await asyncio.to_thread(part.start)


def stored_messages(port):
    """Every message the room keeps, through GET /messages, 1000 at a time."""
    messages = []
    while True:
        since = messages[-1]["id"] if messages else 0
        page = answers(port, f"/messages?since={since}&limit=1000")["messages"]
        if not page:
            return messages
        messages += page


def out_of_order(sequence):
    """How many items come after a greater one."""
    count, highest = 0, None
    for item in sequence:
        if highest is not None and item < highest:
            count += 1
        highest = item if highest is None else max(highest, item)
    return count


def room_counts(clients, stored):
    texts = [message["text"] for message in stored]
    typed = [text for client in clients for text in client.typed]
    seen = collections.Counter(texts)
    lost = sum(1 for text in typed if text not in seen)
    duplicated = sum(count - 1 for count in seen.values())
    place = {text: at for at, text in enumerate(texts)}
    reordered = sum(
        out_of_order([place[text] for text in client.typed if text in place]) for client in clients
    )
    return lost, duplicated, reordered


def delivery_counts(clients, stored):
    ids = {message["id"] for message in stored}
    lost = duplicated = reordered = 0
    for client in clients:
        came = [id_ for id_, own_again in client.arrivals if not own_again]
        lost += len(ids - set(came))
        duplicated += len(came) - len(set(came))
        reordered += out_of_order(came)
    return lost, duplicated, reordered


async def soak(seconds, clients_count, rate, every, use_nginx, directory, log):
    redis = redis_part(directory / "redis", log)
    (directory / "redis").mkdir()
    redis.start()
    nginx_port = free_port()
    use_nginx = use_nginx and nginx_binary() is not None  # else clients alternate after a drop
    public_url = f"http://127.0.0.1:{nginx_port}" if use_nginx else None
    chats = [chat_part(n, redis.url, public_url, log) for n in (1, 2)]
    nginx = nginx_part(directory, nginx_port, chats, log) if use_nginx else None
    parts = [redis, *chats] + ([nginx] if nginx else [])
    try:
        for part in parts[1:]:
            await asyncio.to_thread(part.start)
        if nginx:
            urls = [f"ws://127.0.0.1:{nginx_port}/ws"]
        else:
            urls = [f"ws://127.0.0.1:{chat.ws_port}/" for chat in chats]
        print(
            f"soak: {seconds:g} s, {clients_count} clients typing {rate:g} a second each, "
            f"2 chat.py --redis{' behind nginx' if nginx else ''}, a fault every ~{every:g} s",
            flush=True,
        )
        return await run_clients(seconds, clients_count, rate, every, urls, chats, redis)
    finally:
        for part in reversed(parts):
            with contextlib.suppress(Exception):
                part.stop()


async def run_clients(seconds, clients_count, rate, every, urls, chats, redis):
    clients = [Client(n, urls, rate) for n in range(clients_count)]
    tasks = [asyncio.create_task(work) for c in clients for work in (c.type(), c.run())]
    counts, stopping = collections.Counter(), asyncio.Event()
    chaos = asyncio.create_task(faults(chats, redis, every, counts, stopping))
    await asyncio.sleep(seconds)
    while counts["chat"] < 1 or counts["redis"] < 1:  # a short run has each fault at least once
        await asyncio.sleep(0.1)
    stopping.set()
    await chaos  # the fault under way ends with its part started again
    for client in clients:
        client.typing = False
    drained = await settle(clients, chats[0].port)
    stored = stored_messages(chats[0].port)
    same = stored == stored_messages(chats[1].port)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    room, delivered = room_counts(clients, stored), delivery_counts(clients, stored)
    print(f"faults: {counts['chat']} kill -9 of a chat process, {counts['redis']} of redis-server")
    print(f"typed {sum(len(c.typed) for c in clients)}, stored {len(stored)}: " + counted(room))
    print(f"delivered to {len(clients)} clients: " + counted(delivered))
    print(f"both processes keep the same {len(stored)} messages: {'yes' if same else 'NO'}")
    print(
        f"pending at the end: {sum(len(c.queue) for c in clients)}; "
        f"answers with retry_after: {sum(c.retries for c in clients)}; "
        f"refused for good: {sum(c.refused for c in clients)}; "
        f"reconnects: {sum(c.reconnects for c in clients)}; "
        f"longest without a connection: {max(c.longest_away for c in clients):.1f} s"
    )
    return drained and same and not any(room + delivered)


def counted(counts):
    lost, duplicated, reordered = counts
    return f"lost {lost}, duplicated {duplicated}, reordered {reordered}"


async def settle(clients, port, timeout=60):
    """Waits until nothing is pending and every client has the room's newest message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = answers(port) or {}
        last = health.get("last_id")
        if not any(c.queue for c in clients) and all(c.last_id == last for c in clients):
            return True
        await asyncio.sleep(0.1)
    return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long the faults go on")
    length.add_argument("--seconds", type=float, default=60, help="the same, in seconds")
    parser.add_argument("--clients", type=int, default=4, help="clients typing (default 4)")
    parser.add_argument("--rate", type=float, default=2, help="messages a second each")
    parser.add_argument("--every", type=float, help="seconds between faults, about (default: 10)")
    parser.add_argument("--no-nginx", action="store_true", help="clients connect directly")
    parser.add_argument("--seed", type=int, help="for the random intervals")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60 if args.minutes else args.seconds
    random.seed(args.seed)
    if not shutil.which("redis-server"):
        print(
            "soak_chat.py: error: needs redis-server (apt-get install redis-server)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="soak-") as directory:
        log_path = Path(directory) / "parts.log"
        with log_path.open("w") as log:
            ok = asyncio.run(
                soak(
                    seconds, args.clients, args.rate, args.every or 10, not args.no_nginx,
                    Path(directory), log,
                )
            )  # fmt: skip
        if not ok:
            print(log_path.read_text()[-3000:], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
