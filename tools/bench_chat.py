"""How fast is the chat, against the limit of its own stack?

    python tools/bench_chat.py            the full run (a few minutes)
    python tools/bench_chat.py --quick    a small run (under a minute)
    python tools/bench_chat.py --json results.json --plot docs/latency.png
    python tools/bench_chat.py --only throughput --repeats 5 --aiohttp    the fan-out rows alone

With --aiohttp (and aiohttp installed) the fan-out scenarios also run against the same
minimal server written on aiohttp (send_str() to each client): one more efficiency row.

With redis-server and the redis package installed, one latency run puts the chat on two
processes sharing a room in Redis (--redis), against the baseline on one.

Every scenario runs twice in the same run: against chat.py, and against a baseline, the
smallest broadcast server on `websockets` itself (a set of connections, `broadcast()`, one
`json.dumps` per message) speaking the same protocol. Shared machines are noisy: the
figure that counts is chat / baseline. Each server runs in its own process, and so does
the load generator; the generator's CPU is measured and the table says when it saturated.

The chat's rate limit (20 at once, then 10 a second) is lifted for the benchmark: with it,
one sender measures the limit, not the server. The load generator stands for many people:
each of its connections comes from a loopback address of its own (127.x.y.z), as the tests'
clients do, so the chat's limits per address (100 connections, a bucket of joins) do not apply;
the baseline gets the same clients.
"""

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # where chat.py is
MESSAGE_PREFIX = b'{"type": "message", "id": '  # both servers start every message frame so

# --- The baseline server ---------------------------------------------------------------

BASELINE = r"""
import asyncio, datetime, itertools, json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from websockets.asyncio.server import broadcast, serve

clients = set()
ids = itertools.count(1)


def publish(text):
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    message = {"type": "message", "id": next(ids), "name": "guest", "text": text, "ts": now}
    broadcast(clients, json.dumps(message))
    return message


async def handler(websocket):
    clients.add(websocket)
    try:
        async for frame in websocket:
            publish(json.loads(frame)["text"])
    finally:
        clients.discard(websocket)


class Post(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["text"]
        body = json.dumps(asyncio.run_coroutine_threadsafe(publish_soon(text), loop).result()).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


async def publish_soon(text):
    return publish(text)


async def main():
    global loop
    loop = asyncio.get_running_loop()
    http = ThreadingHTTPServer(("127.0.0.1", 0), Post)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    async with serve(handler, "127.0.0.1", 0) as server:
        print(f"Chat page:  http://127.0.0.1:{http.server_address[1]}/", flush=True)
        print(f"Websocket:  ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/", flush=True)
        await server.serve_forever()

asyncio.run(main())
"""

AIOHTTP = r"""
import asyncio, datetime, itertools, json, socket
from aiohttp import WSMsgType, web

clients = set()
ids = itertools.count(1)


async def publish(text):
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    message = {"type": "message", "id": next(ids), "name": "guest", "text": text, "ts": now}
    data = json.dumps(message)
    for ws in tuple(clients):  # send_str() waits only when that client's buffer is full
        await ws.send_str(data)


async def handler(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    clients.add(ws)
    try:
        async for frame in ws:
            if frame.type == WSMsgType.TEXT:
                await publish(json.loads(frame.data)["text"])
    finally:
        clients.discard(ws)
    return ws


async def main():
    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    port = sock.getsockname()[1]
    print(f"Chat page:  http://127.0.0.1:{port}/", flush=True)  # fan-out scenarios only
    print(f"Websocket:  ws://127.0.0.1:{port}/", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

CHAT = (
    "import sys, chat\n"
    "chat.BURST = chat.PER_SECOND = 10**9  # lift the rate limit: see the module docstring\n"
    "sys.exit(chat.main(sys.argv[1:]))\n"
)


class Server:
    """chat.py or the baseline in a subprocess, with its ports and its memory and CPU."""

    def __init__(self, kind, redis_url=None):
        command = [sys.executable, "-c", AIOHTTP if kind == "aiohttp" else BASELINE]
        self.store = None
        if kind in ("chat", "store"):
            command = [
                sys.executable,
                "-c",
                CHAT,
                "--port",
                "0",
                "--ws-port",
                "0",
                "--history",
                "100000",
            ]
            command += ["--redis", redis_url] if redis_url else []
        if kind == "store":  # the chat with its history kept in SQLite, in a fresh file
            self.store = tempfile.TemporaryDirectory(prefix="bench-store-")
            command += ["--store", str(Path(self.store.name) / "room.db")]
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.port = int(self.process.stdout.readline().rsplit(":", 1)[1].strip("/\n"))
        self.ws_port = int(self.process.stdout.readline().rsplit(":", 1)[1].strip("/\n"))

    def cpu_seconds(self):
        return cpu_seconds(self.process.pid)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.store:
            self.store.cleanup()


# --- The load generator: a raw websocket client, cheap enough to run a thousand -------


class Client(asyncio.Protocol):
    """A websocket client that finds message ids in the byte stream and nothing else.

    websockets' own client parses every frame; at 1000 receivers the generator would then
    measure itself. Both servers start every message frame with MESSAGE_PREFIX (a JSON
    string cannot hold it unescaped), so `bytes.find` locates each message and its id at C
    speed. It does not answer pings: every scenario ends before the first one (20 s).
    """

    def __init__(self, port, deflate, on_message, path="/"):
        self.port, self.deflate, self.on_message, self.path = port, deflate, on_message, path
        self.tail = b""  # the end of the last chunk, which may hold the start of a message
        self.open = asyncio.get_running_loop().create_future()
        self.last_id, self.received, self.lost, self.duplicated, self.reordered = 0, 0, 0, 0, 0

    def connection_made(self, transport):
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        offer = (
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            if self.deflate
            else ""
        )
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n".encode()
        )

    def data_received(self, data):
        now = time.perf_counter()
        data = self.tail + data
        if not self.open.done():
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.tail = data
                return
            self.open.set_result(data.startswith(b"HTTP/1.1 101"))
            data = data[end + 4 :]
        position = 0
        while (found := data.find(MESSAGE_PREFIX, position)) >= 0:
            comma = data.find(b",", found + len(MESSAGE_PREFIX))
            if comma < 0:
                break  # the id is not all here yet
            self.count(int(data[found + len(MESSAGE_PREFIX) : comma]), now)
            position = comma
        else:
            found = max(position, len(data) - len(MESSAGE_PREFIX) + 1)
        self.tail = data[found:]

    def count(self, message_id, now):
        self.received += 1
        if message_id == self.last_id + 1:
            pass
        elif message_id > self.last_id + 1:
            self.lost += message_id - self.last_id - 1
        elif message_id == self.last_id:
            self.duplicated += 1
        else:
            self.reordered += 1
        self.last_id = max(self.last_id, message_id)
        if self.on_message:
            self.on_message(message_id, now)

    def send(self, payload, opcode=1):
        """A masked frame, with a zero mask: allowed, and the payload needs no work."""
        length = len(payload)
        if length < 126:
            header = bytes([0x80 | opcode, 0x80 | length])
        else:
            header = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
        self.transport.write(header + b"\0\0\0\0" + payload)


PEOPLE = itertools.count(1)  # the next client's number, for its own loopback address


def next_person():
    """A loopback address of its own for the next client: 127.0.0.2, 127.0.0.3, ... 127.x.y.z."""
    n = next(PEOPLE)
    return f"127.{n // 254 // 254 % 254}.{n // 254 % 254}.{n % 254 + 1}", 0


async def open_clients(port, count, deflate=False, on_message=None, path="/"):
    loop = asyncio.get_running_loop()
    clients = []
    for first in range(0, count, 100):  # in groups, so the listen backlog is never full
        batch = [
            loop.create_connection(
                lambda: Client(port, deflate, on_message, path),
                "127.0.0.1",
                port,
                local_addr=next_person(),
            )
            for _ in range(first, min(count, first + 100))
        ]
        for _, client in await asyncio.gather(*batch):
            assert await asyncio.wait_for(client.open, 30), "handshake refused"
            clients.append(client)
    return clients


def close_all(clients):
    for client in clients:
        client.transport.abort()


def integrity(clients, expected):
    """Lost, duplicated and out-of-order deliveries over all receivers."""
    lost = sum(c.lost + (expected - c.last_id) for c in clients)
    return {
        "lost": lost,
        "duplicated": sum(c.duplicated for c in clients),
        "reordered": sum(c.reordered for c in clients),
    }


async def wait_for_delivery(clients, expected, timeout):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline and any(c.last_id < expected for c in clients):
        await asyncio.sleep(0.01)


class CpuMeter:
    """This process's CPU use over a stretch of wall time: near 1.0 means it saturated."""

    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *_):
        self.share = (time.process_time() - self.cpu) / (time.perf_counter() - self.wall)


def text_of(n, size=100):
    return json.dumps({"type": "message", "text": f"{n:08d} ".ljust(size, "x")}).encode()


async def fan_out_throughput(ws_port, server_pid, receivers, seconds, window=50):
    """One sender as fast as the server accepts, at most `window` messages in flight.

    The server's CPU time is read around the fan-out itself: the handshakes before it (and
    the chat's presence frames while a big room fills) are not what "per delivery" means.
    """
    window_moved = asyncio.Event()
    sender, *others = await open_clients(ws_port, receivers, on_message=None)
    sender.on_message = lambda message_id, now: window_moved.set()  # its own message came back
    clients = [sender, *others]
    sent = 0
    server_cpu = cpu_seconds(server_pid)
    with CpuMeter() as meter:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            while sent - sender.last_id < window:
                sent += 1
                sender.send(text_of(sent))
            window_moved.clear()
            await window_moved.wait()
        await wait_for_delivery(clients, sent, 30)
        took = time.perf_counter() - started
    server_cpu = cpu_seconds(server_pid) - server_cpu
    result = {
        "receivers": receivers,
        "messages": sent,
        "deliveries": sum(c.received for c in clients),
        "deliveries_per_s": sum(c.received for c in clients) / took,
        "generator_cpu": meter.share,
        "server_cpu_s": server_cpu,
        **integrity(clients, sent),
    }
    close_all(clients)
    return result


async def fan_out_latency(ws_ports, receivers, seconds, rate=20):
    """A steady `rate` messages a second; send-to-receive time of every delivery.

    With several ports (chat.py processes sharing a room in Redis), the receivers are
    spread over them and the sender is on the first.
    """
    sent_at, latencies = {}, []
    clients = []
    for ws_port in ws_ports:
        clients += await open_clients(
            ws_port,
            receivers // len(ws_ports),
            on_message=lambda i, now: latencies.append(now - sent_at[i]),
        )
    sender = clients[0]
    total = int(seconds * rate)
    with CpuMeter() as meter:
        started = time.perf_counter()
        for n in range(1, total + 1):
            await asyncio.sleep(max(0, started + n / rate - time.perf_counter()))
            sent_at[n] = time.perf_counter()
            sender.send(text_of(n))
        await wait_for_delivery(clients, total, 30)
    result = {
        "receivers": receivers,
        "messages": total,
        **percentiles(latencies),
        "generator_cpu": meter.share,
        **integrity(clients, total),
    }
    close_all(clients)
    return result


def percentiles(latencies):
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000, "max_ms": max(latencies) * 1000}


async def http_to_websocket(port, ws_port, receivers, seconds, connections=8):
    """POST /messages from keep-alive connections; time from the request to each delivery."""
    posted_at, deliveries = {}, []
    clients = await open_clients(
        ws_port, receivers, on_message=lambda i, now: deliveries.append((i, now))
    )
    requests = 0

    async def poster(n):
        nonlocal requests
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=next_person())
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            body = json.dumps({"name": f"http{n}", "text": f"from http {n}"}).encode()
            begun = time.perf_counter()
            writer.write(
                f"POST /messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            answer = json.loads(await reader.readexactly(length))
            posted_at[answer["id"]] = begun
            requests += 1
        writer.close()

    with CpuMeter() as meter:
        started = time.perf_counter()
        await asyncio.gather(*(poster(n) for n in range(connections)))
        took = time.perf_counter() - started
        await wait_for_delivery(clients, requests, 30)
    latencies = [now - posted_at[i] for i, now in deliveries]
    result = {
        "receivers": receivers,
        "requests_per_s": requests / took,
        **percentiles(latencies),
        "generator_cpu": meter.share,
        **integrity(clients, requests),
    }
    close_all(clients)
    return result


async def idle_memory(server_pid, ws_port, count):
    """Server RSS per idle connection; clients offer compression, as browsers do."""
    warm = await open_clients(ws_port, 10, deflate=True)  # the first connections load code
    await asyncio.sleep(0.5)
    before = rss(server_pid)
    clients = await open_clients(ws_port, count, deflate=True)
    await asyncio.sleep(1)
    result = {"connections": count, "bytes_per_connection": (rss(server_pid) - before) / count}
    close_all(clients + warm)
    return result


def cpu_seconds(pid):
    """CPU time a process has used so far, user and system, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid, field="VmRSS"):
    """Resident memory of a process in bytes: now, or its peak with field="VmHWM"."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) * 1024


async def resume(server_pid, ws_port, kept, size=2000, window=200):
    """One client resumes with since=0 after `kept` messages of `size` characters, while
    another pings the server every 10 ms: how long the resume takes, the server's peak
    memory on top of what it held, and the longest ping (the event loop's stall as another
    client sees it) against the longest ping of the same client with nothing going on."""
    moved = asyncio.Event()
    sent = 0
    while sent < kept:  # fill the room, at most `window` messages in flight
        # A fresh sender for each 10,000: Client answers no pings, and a loaded machine took
        # longer than the ping timeout (40 s) to fill 100,000, and the sender was dropped.
        (sender,) = await open_clients(ws_port, 1, on_message=lambda message_id, now: moved.set())
        until = min(kept, sent + 10_000)
        while sender.last_id < until:  # its history says where the room is
            while sent < min(until, sender.last_id + window):
                sent += 1
                sender.send(text_of(sent, size))
            moved.clear()
            await asyncio.wait_for(moved.wait(), 30)
        close_all([sender])

    from websockets.asyncio.client import connect

    idle, busy = [], []
    url = f"ws://127.0.0.1:{ws_port}/"
    async with connect(url, max_queue=None, max_size=None, local_addr=next_person()) as pinger:
        await ping_times(pinger, idle, seconds=1)
        Path(f"/proc/{server_pid}/clear_refs").write_text("5")  # Linux: VmHWM starts again from now
        before = rss(server_pid)
        pings = asyncio.create_task(ping_times(pinger, busy, seconds=600))
        started = time.perf_counter()
        (client,) = await open_clients(ws_port, 1, path="/?since=0")
        await wait_for_delivery([client], kept, 120)
        took = time.perf_counter() - started
        pings.cancel()
    result = {
        "kept": kept,
        "size": size,
        "resume_s": took,
        "peak_mb": (rss(server_pid, "VmHWM") - before) / 2**20,
        "stall_ms": max(busy, default=0) * 1000,
        "idle_stall_ms": max(idle) * 1000,
        **integrity([client], kept),
    }
    close_all([client])
    return result


async def ping_times(ws, times, seconds):
    """Appends to `times` the round trip of a ping every 10 ms, for `seconds` or until cancelled."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        begun = time.perf_counter()
        await (await ws.ping())
        times.append(time.perf_counter() - begun)
        await asyncio.sleep(0.01)


def generate(scenario, args):
    """Runs in the load generator's own process: one scenario, its result as JSON on stdout."""
    if scenario == "throughput":
        run = fan_out_throughput(args["ws_port"], args["pid"], args["receivers"], args["seconds"])
    elif scenario == "latency":
        run = fan_out_latency(args["ws_ports"], args["receivers"], args["seconds"])
    elif scenario == "http":
        run = http_to_websocket(args["port"], args["ws_port"], args["receivers"], args["seconds"])
    elif scenario == "resume":
        run = resume(args["pid"], args["ws_port"], args["kept"])
    else:
        run = idle_memory(args["pid"], args["ws_port"], args["connections"])
    print(json.dumps(asyncio.run(run)))


# --- The run: every scenario against both servers, side by side -----------------------


def scenarios(quick):
    seconds = 2 if quick else 6
    return (
        [
            (
                "throughput",
                f"fan-out throughput, {n} receivers",
                {"receivers": n, "seconds": seconds},
            )
            for n in ((100, 500) if quick else (100, 1000))
        ]
        + [
            (
                "latency",
                f"latency at 20 msg/s, {n} receivers",
                {"receivers": n, "seconds": seconds * 2},
            )
            for n in ((100, 500) if quick else (100, 300, 1000))
        ]
        + [
            (
                "latency",
                f"latency at 20 msg/s, {n} receivers on 2 chat.py + Redis",
                {"receivers": n, "seconds": seconds * 2, "processes": 2},
            )
            for n in ((100,) if quick else (1000,))
            if shutil.which("redis-server") and importlib.util.find_spec("redis")
        ]
        + [
            (
                "latency",
                f"latency at 20 msg/s, {n} receivers: --store, against the in-process list",
                {"receivers": n, "seconds": seconds * 2, "versus": "store"},
            )
            for n in ((100,) if quick else (100, 1000))
        ]
        + [
            (
                "http",
                "POST /messages to delivery, 100 receivers",
                {"receivers": 100, "seconds": seconds},
            ),
            ("memory", "memory per idle connection", {"connections": 500 if quick else 2000}),
        ]
    )


def resumes(quick):
    biggest = 10_000 if quick else 100_000
    return [
        ("resume", f"resume of {kept:,} kept messages of 2,000 characters", {"kept": kept})
        for kept in (1000, biggest)
    ] + [
        (
            "resume",
            f"resume of {biggest:,} kept messages of 2,000 characters, with --store",
            {"kept": biggest, "store": True},
        )
    ]


def run_resumes(quick, only=None):
    """The chat alone (the baseline keeps no history): its own figures, against the same
    client's pings with nothing going on, in the same run. With --only store, the biggest
    resume with and without --store."""
    rows = []
    plan = resumes(quick)[1:] if only else resumes(quick)
    for step, (scenario, title, args) in enumerate(plan, 1):
        print(f"[resume {step}/{len(plan)}] {title} ...", file=sys.stderr, flush=True)
        row = {
            "scenario": scenario,
            "title": title,
            "args": args,
            "chat": measure("store" if args.get("store") else "chat", scenario, args),
        }
        rows.append(row)
        print("    " + resume_summary(row), file=sys.stderr, flush=True)
    return rows


def resume_summary(row):
    r = row["chat"]
    return (
        f"{r['resume_s']:.2f} s, peak +{r['peak_mb']:.0f} MB, longest ping {r['stall_ms']:.1f} ms "
        f"(idle {r['idle_stall_ms']:.1f} ms), lost, dup, reordered {r['lost']}, {r['duplicated']}, {r['reordered']}"
    )


def resume_table(rows):
    lines = [
        (
            "| resume with since=0 | time (s) | server peak memory (MB above before) | another client's longest ping: "
            "during / idle (ms) | lost, dup, reordered |"
        ),
        "|---|---|---|---|---|",
    ]
    for row in rows:
        r = row["chat"]
        lines.append(
            f"| {row['title']} | {r['resume_s']:.2f} | {r['peak_mb']:.0f} | {r['stall_ms']:.1f} / "
            f"{r['idle_stall_ms']:.1f} | {r['lost']}, {r['duplicated']}, {r['reordered']} |"
        )
    return "\n".join(lines)


def measure(kind, scenario, args):
    """One scenario against fresh servers: one, or for the chat with "processes": 2, two
    chat.py processes sharing a room in a fresh redis-server."""
    redis_server = start_redis() if kind == "chat" and args.get("processes") == 2 else None
    redis_url = redis_server and f"redis://127.0.0.1:{redis_server.args[2]}/0"
    servers = [Server(kind, redis_url) for _ in range(2 if redis_server else 1)]
    try:
        args = {
            **args,
            "port": servers[0].port,
            "ws_port": servers[0].ws_port,
            "pid": servers[0].process.pid,
            "ws_ports": [server.ws_port for server in servers],
        }
        cpu_before = sum(server.cpu_seconds() for server in servers)
        generator = subprocess.run(
            [sys.executable, __file__, "--generate", scenario, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if generator.returncode:
            raise RuntimeError(f"load generator failed:\n{generator.stderr}")
        result = json.loads(generator.stdout)
        cpu_s = sum(server.cpu_seconds() for server in servers) - cpu_before
        result.setdefault("server_cpu_s", cpu_s)  # throughput reads its own
        if scenario == "throughput":  # the server's own cost, whoever saturated first
            result["deliveries_per_cpu_s"] = result["deliveries"] / result["server_cpu_s"]
        return result
    finally:
        for server in servers:
            server.stop()
        if redis_server:
            redis_server.terminate()
            redis_server.wait(10)


def start_redis():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    redis_server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return redis_server
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


HEADLINE = {
    "throughput": ("deliveries_per_s", "deliveries/s", True),
    "efficiency": ("deliveries_per_cpu_s", "deliveries per server CPU-second", True),
    "latency": ("p99_ms", "p99 ms", False),
    "http": ("requests_per_s", "requests/s", True),
    "memory": ("bytes_per_connection", "bytes/conn", False),
}


def run_all(quick, only=None, repeats=3, aiohttp=False):
    rows = []
    plan = [step for step in scenarios(quick) if not only or wanted(step, only)]
    for step, (scenario, title, args) in enumerate(plan, 1):
        # which server's runs fill each column: the --store row puts the in-process chat
        # in the baseline's column
        columns = {"baseline": "chat", "chat": "store"} if "versus" in args else CHAT_VS_BASELINE
        kinds = [*columns.values()] + (["aiohttp"] if aiohttp and scenario == "throughput" else [])
        row = {
            "scenario": scenario,
            "title": title,
            "args": args,
            "runs": {kind: [] for kind in kinds},
        }
        runs = 1 if quick or scenario in ("memory", "http") else repeats  # fan-out is the noisiest
        for repeat in range(runs):
            # each goes first in turn
            for kind in kinds[repeat % len(kinds) :] + kinds[: repeat % len(kinds)]:
                print(
                    f"[{step}/{len(plan)}] {title}: {kind} ({repeat + 1}/{runs}) ...",
                    file=sys.stderr,
                    flush=True,
                )
                row["runs"][kind].append(measure(kind, scenario, args))
        for column, kind in columns.items():
            row[column] = median_run(row["runs"][kind], HEADLINE[scenario][0])
        rows.append(with_ratio(row))
        print("    " + summary(row), file=sys.stderr, flush=True)
        if scenario == "throughput":
            efficiency = {
                **row,
                "scenario": "efficiency",
                "title": title.replace("throughput", "efficiency"),
            }
            for kind in ("baseline", "chat"):
                efficiency[kind] = median_run(row["runs"][kind], "deliveries_per_cpu_s")
            rows.append(with_ratio(efficiency))
            print("    " + summary(efficiency), file=sys.stderr, flush=True)
        if "aiohttp" in kinds:  # the same runs, with aiohttp in the baseline's column
            versus = {**efficiency, "title": efficiency["title"] + ", against aiohttp"}
            versus["baseline"] = median_run(row["runs"]["aiohttp"], "deliveries_per_cpu_s")
            rows.append(with_ratio(versus))
            print("    " + summary(versus), file=sys.stderr, flush=True)
    return rows


CHAT_VS_BASELINE = {"baseline": "baseline", "chat": "chat"}


def wanted(step, only):
    """--only store is the --store row; --only latency is the other latency rows."""
    scenario, _, args = step
    return ("store" in only) if "versus" in args else scenario in only


def median_run(runs, key):
    """The run with the median figure; lost, duplicated and reordered summed over all runs."""
    chosen = dict(sorted(runs, key=lambda run: run[key])[len(runs) // 2])
    for fault in ("lost", "duplicated", "reordered"):
        if fault in chosen:
            chosen[fault] = sum(run[fault] for run in runs)
    if "generator_cpu" in chosen:
        chosen["generator_cpu"] = max(run["generator_cpu"] for run in runs)
    return chosen


def with_ratio(row):
    key = HEADLINE[row["scenario"]][0]
    row["ratio"] = row["chat"][key] / row["baseline"][key]
    return row


def summary(row):
    key, unit, _ = HEADLINE[row["scenario"]]
    chat, baseline = row["chat"], row["baseline"]
    text = f"{unit}: chat {chat[key]:,.1f}, baseline {baseline[key]:,.1f}, ratio {row['ratio']:.2f}"
    if row["scenario"] == "latency":
        text += f" (p50 {chat['p50_ms']:.1f} / {baseline['p50_ms']:.1f}, max {chat['max_ms']:.1f} / {baseline['max_ms']:.1f})"
    if row["scenario"] == "http":
        text += f" (p99 {chat['p99_ms']:.1f} ms / {baseline['p99_ms']:.1f} ms)"
    return text


def table(rows):
    lines = [
        "| scenario | chat | baseline | chat / baseline | lost, dup, reordered (chat / baseline) | generator CPU (chat / baseline) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        key, unit, _ = HEADLINE[row["scenario"]]
        chat, baseline = row["chat"], row["baseline"]
        if row["scenario"] in ("memory", "efficiency"):
            faults = cpu = ""
        else:
            faults = " / ".join(
                f"{r['lost']}, {r['duplicated']}, {r['reordered']}" for r in (chat, baseline)
            )
            cpu = " / ".join(
                f"{r['generator_cpu']:.0%}" + (" saturated" if r["generator_cpu"] > 0.9 else "")
                for r in (chat, baseline)
            )
        lines.append(
            f"| {row['title']} ({unit}) | {chat[key]:,.1f} | {baseline[key]:,.1f} | {row['ratio']:.2f} | {faults} | {cpu} |"
        )
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    latency = [
        r
        for r in rows
        if r["scenario"] == "latency" and not {"processes", "versus"} & r["args"].keys()
    ]
    receivers = [r["args"]["receivers"] for r in latency]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for kind, style, colour in (("chat", "o-", "tab:blue"), ("baseline", "s--", "tab:gray")):
        axes.plot(
            receivers,
            [r[kind]["p99_ms"] for r in latency],
            style,
            color=colour,
            label=f"{kind} p99",
        )
        axes.plot(
            receivers,
            [r[kind]["p50_ms"] for r in latency],
            style,
            color=colour,
            alpha=0.4,
            label=f"{kind} p50",
        )
    axes.set_xlabel("receivers")
    axes.set_ylabel("send to receive, ms")
    axes.set_title("Latency at 20 messages a second")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(
        description="Benchmark chat.py against a minimal websockets broadcast server."
    )
    parser.add_argument("--quick", action="store_true", help="a small run, under a minute")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--plot", metavar="PNG", help="plot latency against receivers (needs matplotlib)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=("throughput", "latency", "http", "memory", "store"),
        help="run only this kind of scenario (repeatable); throughput also gives efficiency; "
        "store: --store against the in-process list (latency and the biggest resume)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each fan-out scenario, median shown (3)"
    )
    parser.add_argument(
        "--aiohttp",
        action="store_true",
        help="fan-out also against an aiohttp server (needs aiohttp)",
    )
    # the load generator's own process
    parser.add_argument("--generate", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        return generate(args.generate[0], json.loads(args.generate[1]))
    if args.aiohttp and not importlib.util.find_spec("aiohttp"):
        parser.error("--aiohttp needs aiohttp: python -m pip install aiohttp")
    rows = run_all(args.quick, args.only, args.repeats, args.aiohttp)
    resume_rows = (
        run_resumes(args.quick, only="store")
        if args.only and "store" in args.only
        else []
        if args.only
        else run_resumes(args.quick)
    )
    print(table(rows))
    if resume_rows:
        print()
        print(resume_table(resume_rows))
    faults = sum(
        r[k][f]
        for r in rows
        if r["scenario"] not in ("memory", "efficiency")
        for k in ("chat", "baseline")
        for f in ("lost", "duplicated", "reordered")
    )
    faults += sum(r["chat"][f] for r in resume_rows for f in ("lost", "duplicated", "reordered"))
    if any(r[k].get("generator_cpu", 0) > 0.9 for r in rows for k in ("chat", "baseline")):
        print(
            "The load generator saturated a core in some runs (see the table): there, both servers were\n"
            "measured against the same limit, and 'deliveries per server CPU-second' is the fairer figure."
        )
    print(f"\nLost, duplicated or reordered deliveries in all runs: {faults}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"quick": args.quick, "rows": rows + resume_rows}, indent=2)
        )
    if args.plot:
        plot(rows, args.plot)
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main())
