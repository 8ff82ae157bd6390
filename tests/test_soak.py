"""Soaks: clients that chat, drop and resume at random while HTTP posts run; and the fault soak
(tools/soak_chat.py), which kills each part of the online chat in turn.
"""

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import threading

import pytest

from tests.helpers import (
    TOOLS,
    connect_from,
    get,
    needed_program,
    open_fds,
    post,
    run_async,
    running_servers,
    wait_for_health,
)

pytestmark = pytest.mark.slow


SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))


SOAK_CLIENTS = 100


def test_soak_clients_that_drop_and_resume_miss_nothing_and_leave_nothing_behind():
    fds_before = open_fds()
    with running_servers(history=100_000) as servers:
        soak_and_check(servers)
    assert open_fds() <= fds_before


def soak_and_check(servers):
    """SOAK_CLIENTS clients chat, drop and resume for SOAK_SECONDS while HTTP posts run; then
    each must have been shown every message once, in order."""
    rng = random.Random(7)
    seen = {n: [] for n in range(SOAK_CLIENTS)}  # every message id each client was shown, in order
    resumes = [0]

    async def client(n, deadline):
        while asyncio.get_running_loop().time() < deadline:
            since = seen[n][-1] if seen[n] else 0
            query = {"name": f"soak{n}", "since": since}
            # 100 people: each an address of its own
            async with connect_from(
                servers, f"127.0.2.{n + 1}", query=query, open_timeout=10
            ) as ws:
                resumes[0] += 1
                stay = rng.uniform(0.2, 3)
                chat_until = asyncio.get_running_loop().time() + stay
                next_send = 0.0
                while (now := asyncio.get_running_loop().time()) < min(chat_until, deadline):
                    if now >= next_send:
                        await ws.send(f"from soak{n}")
                        next_send = now + rng.uniform(1, 6)
                    try:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 0.2))
                    except TimeoutError:
                        continue
                    record(n, frame)
                if rng.random() < 0.5:
                    ws.transport.abort()  # half of the drops are abrupt, like a lost network
            await asyncio.sleep(rng.uniform(0, 0.3))

    def record(n, frame):
        batch = (
            frame["messages"]
            if frame["type"] == "history"
            else [frame]
            if frame["type"] == "message"
            else []
        )
        seen[n].extend(m["id"] for m in batch)

    async def catch_up(n, last_id):
        since = seen[n][-1] if seen[n] else 0
        query = {"since": since}
        async with connect_from(servers, f"127.0.2.{n + 1}", query=query, open_timeout=10) as ws:
            while not seen[n] or seen[n][-1] < last_id:
                record(n, json.loads(await asyncio.wait_for(ws.recv(), 10)))

    def http_poster(stop):
        n = 0
        while not stop.wait(0.1):
            n += 1
            assert (
                post(
                    servers.port,
                    "/messages",
                    {"name": "http", "text": f"post {n}"},
                    source="127.0.3.1",
                )[0]
                == 201
            )

    async def run():
        deadline = asyncio.get_running_loop().time() + SOAK_SECONDS
        await asyncio.gather(*(client(n, deadline) for n in range(SOAK_CLIENTS)))
        stop.set()
        await asyncio.to_thread(poster.join, 10)
        last_id = get(servers.port, "/health")[1]["last_id"]  # nobody posts any more
        await asyncio.gather(*(catch_up(n, last_id) for n in range(SOAK_CLIENTS)))
        return last_id

    stop = threading.Event()
    poster = threading.Thread(target=http_poster, args=(stop,))
    poster.start()
    try:
        last_id = run_async(run())
    finally:
        stop.set()
        poster.join(10)
    assert resumes[0] > SOAK_CLIENTS * 2 and last_id > SOAK_SECONDS * 10
    for n in range(SOAK_CLIENTS):
        assert seen[n] == list(range(1, last_id + 1)), f"client {n} missed or doubled a message"
    wait_for_health(servers.port, timeout=5, clients=0)


@pytest.mark.redis
@pytest.mark.timeout(150)
def test_fault_soak_briefly_kills_each_part_and_loses_duplicates_and_reorders_nothing():
    needed_program("redis-server", "redis-server")
    soak = subprocess.run(
        [sys.executable, str(TOOLS / "soak_chat.py"), "--seconds", "10", "--every", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert soak.returncode == 0, soak.stdout + soak.stderr[-3000:]
    kills = re.search(
        r"faults: (\d+) kill -9 of a chat process, (\d+) of redis-server", soak.stdout
    )
    assert kills and int(kills[1]) >= 1 and int(kills[2]) >= 1
    assert soak.stdout.count("lost 0, duplicated 0, reordered 0") == 2  # typed, and delivered
    assert "pending at the end: 0;" in soak.stdout
