"""One voice per address. Each client address is one person to the chat: the tests' clients use
loopback addresses of their own (127.0.0.0/8 is all this machine), as many people would. An
address has one rate limit (a burst of 20, then 10 a second) over all its websockets and HTTP
posts, a bounded number of connections, and cannot flood anyone else.
"""

import asyncio
import contextlib
import json
import threading
import time

from parts import voices

# isort: split
import pytest
import websockets

from tests.helpers import (
    BURST,
    PER_SECOND,
    PRESENCE_EVERY,
    connect_from,
    flood,
    get,
    joined,
    post,
    receive,
    receive_until,
    rename,
    request,
    run_async,
    stored_texts,
    the_room,
    wait_until,
)


def most_allowed(seconds):
    """The most messages the rate limit lets through in `seconds`: the burst and its refill."""
    return BURST + PER_SECOND * seconds


def test_more_than_20_at_once_gets_too_fast_errors_and_nothing_is_stored(server):
    with joined(server) as (ws, _):
        began = time.monotonic()
        for n in range(40):
            ws.send(f"m{n}")
        frames = receive_until(ws, lambda frames: len(frames) == 40, kinds=("message", "error"))
        took = time.monotonic() - began
    messages = [f for f in frames if f["type"] == "message"]
    errors = [f for f in frames if f["type"] == "error"]
    assert [m["text"] for m in messages[:BURST]] == [f"m{n}" for n in range(BURST)]  # the burst
    assert len(messages) <= most_allowed(took)  # and what refilled meanwhile, no more
    assert len(errors) == 40 - len(messages) and all("too fast" in e["error"] for e in errors)
    assert len(get(server.port, "/messages")[1]["messages"]) == len(messages)


def test_http_posts_past_the_limit_get_429_and_other_addresses_carry_on(server):
    began = time.monotonic()
    responses = [
        request(server.port, "POST", "/messages", {"text": f"flood {n}"}, source="127.0.0.5")
        for n in range(40)
    ]
    took = time.monotonic() - began
    assert [response.status for response in responses[:BURST]] == [201] * BURST  # the burst
    stored = [response for response in responses if response.status == 201]
    refused = [response for response in responses if response.status == 429]
    assert len(stored) <= most_allowed(took) and len(stored) + len(refused) == 40
    assert all("too fast" in json.loads(response.body)["errors"]["text"] for response in refused)
    assert post(server.port, "/messages", {"text": "someone else"}, source="127.0.0.6")[0] == 201
    assert len(get(server.port, "/messages")[1]["messages"]) == len(stored) + 1


def test_429_says_retry_after_1_second(server):
    for n in range(BURST):
        assert post(server.port, "/messages", {"text": f"burst {n}"}, source="127.0.0.7")[0] == 201
    response = request(
        server.port, "POST", "/messages", {"text": "one too many"}, source="127.0.0.7"
    )
    assert response.status == 429
    assert response.headers["Retry-After"] == "1"


def test_a_flooding_websocket_does_not_stop_anyone_else(server):
    with (
        joined(server, name="flood") as (flood, _),
        joined(server, "127.0.0.8", name="calm") as (calm, _),
    ):
        began = time.monotonic()
        for n in range(60):
            flood.send(f"flood {n}")
        calm.send("calm one")
        first = receive_until(calm, lambda frames: frames and frames[-1]["text"] == "calm one")[:-1]
        # only what the flood may send came first
        assert len(first) <= most_allowed(time.monotonic() - began)
    stored = stored_texts(server.port)
    took = time.monotonic() - began
    assert "calm one" in stored
    assert len(stored) - 1 <= most_allowed(took)  # the flood got its burst and the refill, no more


STEADY = 40  # messages sent after the burst at twice the sustained rate: 2 seconds of it


def send_at(rate, count, send):
    """send(n) for n = 0, 1, ... count - 1 at `rate` a second on a fixed schedule (a late
    start catches up); returns the time just before the last send."""
    began = time.monotonic()
    for n in range(count):
        threading.Event().wait(max(0.0, began + n / rate - time.monotonic()))
        last = time.monotonic()
        send(n)
    return last


def assert_held_to_the_rate(accepted, began, steady_began, steady_last_sent, ended):
    """After a spent burst, a sender twice as fast as PER_SECOND gets PER_SECOND a second.

    Bounds from the rule and the times measured: no more than the refill since `began` (the
    burst took the rest); no fewer than the refill while the steady sender was sending, less
    3 for the fractions of a token at either end and one send interval.
    """
    assert accepted <= most_allowed(ended - began) - BURST
    assert accepted >= PER_SECOND * (steady_last_sent - steady_began) - 3


def test_after_the_burst_a_websocket_may_send_10_a_second(server):
    with joined(server) as (ws, _):
        began = time.monotonic()
        for n in range(BURST):
            ws.send(f"burst {n}")
        burst = receive_until(ws, lambda frames: len(frames) == BURST, ("message", "error"))
        steady_began = time.monotonic()
        last_sent = send_at(2 * PER_SECOND, STEADY, lambda n: ws.send(f"steady {n}"))
        steady = receive_until(ws, lambda frames: len(frames) == STEADY, ("message", "error"))
        ended = time.monotonic()
    assert [frame["type"] for frame in burst] == ["message"] * BURST
    accepted = sum(frame["type"] == "message" for frame in steady)
    assert_held_to_the_rate(accepted, began, steady_began, last_sent, ended)
    assert all("too fast" in frame["error"] for frame in steady if frame["type"] == "error")


def test_after_the_burst_an_address_may_post_10_a_second(server):
    def post_one(text):
        return post(server.port, "/messages", {"text": text}, source="127.0.0.8")[0]

    began = time.monotonic()
    assert [post_one(f"burst {n}") for n in range(BURST)] == [201] * BURST
    steady_began, statuses = time.monotonic(), []
    last_sent = send_at(2 * PER_SECOND, STEADY, lambda n: statuses.append(post_one(f"steady {n}")))
    ended = time.monotonic()
    assert set(statuses) <= {201, 429}
    assert_held_to_the_rate(statuses.count(201), began, steady_began, last_sent, ended)


def without_refill(monkeypatch):
    """The running room's limits per address refill one message in 1000 s: within a test an
    address gets its burst and no more, however slow the machine (and a refill in between
    cannot hide a limit that is not there)."""
    monkeypatch.setattr(the_room().message_buckets, "per_second", 0.001)


async def send_and_wait_for_answers(ws, count, name):
    """Sends `count` messages with refs; waits until each was stored or refused. How many
    were stored."""
    refs = {f"{name}-{n}" for n in range(count)}
    for ref in sorted(refs):
        await ws.send(json.dumps({"type": "message", "text": ref, "ref": ref}))
    stored = 0
    while refs:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame.get("ref") in refs and frame["type"] in ("message", "error"):
            refs.remove(frame["ref"])
            stored += frame["type"] == "message"
    return stored


def test_40_connections_of_one_address_store_no_more_than_one_connection_would(server, monkeypatch):
    without_refill(monkeypatch)

    async def run():
        clients = [await connect_from(server, "127.0.4.1") for _ in range(40)]
        stored = await asyncio.gather(
            *(send_and_wait_for_answers(ws, BURST, f"c{n}") for n, ws in enumerate(clients))
        )
        for ws in clients:
            await ws.close()
        return sum(stored)

    assert run_async(run()) == BURST  # 40 bursts of 20 were 800 messages
    assert len(stored_texts(server.port)) == BURST


def test_the_http_posts_of_an_address_share_the_limit_of_its_websockets(server, monkeypatch):
    without_refill(monkeypatch)
    with joined(server, "127.0.4.2") as (ws, _):
        for n in range(BURST):
            ws.send(f"ws {n}")
        receive_until(ws, lambda frames: len(frames) == BURST)  # its burst, stored
        statuses = [
            post(server.port, "/messages", {"text": f"http {n}"}, source="127.0.4.2")[0]
            for n in range(10)
        ]
    assert statuses == [429] * 10  # the burst was spent over websocket
    assert len(stored_texts(server.port)) == BURST


def test_an_address_past_its_limit_leaves_another_address_untouched(server):
    with joined(server, "127.0.4.3") as (flood, _):
        for n in range(3 * BURST):
            flood.send(f"flood {n}")
        assert receive(flood, "error")["error"].startswith("too many messages too fast")
        with joined(server, "127.0.4.4", name="calm") as (calm, _):
            calm.send("calm over websocket")
            receive_until(calm, lambda frames: frames and frames[-1]["name"] == "calm")
        status, _ = post(server.port, "/messages", {"text": "calm over HTTP"}, source="127.0.4.4")
    assert status == 201
    assert stored_texts(server.port)[-2:] == ["calm over websocket", "calm over HTTP"]


def presence_bytes_bound(seconds):
    """The most presence an address that joins in a loop may cost another client: each join it
    is let in for and its leave, at most 40 bytes each, and a frame's own 60 bytes at most every
    PRESENCE_EVERY; "a few KB" for 5 s."""
    joins = voices.JOIN_BURST + voices.JOINS_PER_SECOND * seconds
    return 2 * joins * 40 + (seconds / PRESENCE_EVERY + 2) * 60


def test_an_address_connecting_in_a_loop_for_5_s_costs_others_only_a_few_kb_of_presence(server):
    refusals = []

    async def join_and_leave_in_a_loop():
        began = time.monotonic()
        while time.monotonic() - began < 5 or not refusals and time.monotonic() - began < 30:
            try:
                async with connect_from(server, "127.0.4.6"):
                    pass
            except websockets.exceptions.InvalidStatus as refused:
                refusals.append(refused.response)
        return time.monotonic() - began

    with joined(server, "127.0.4.5", name="watcher") as (watcher, _):
        took = run_async(join_and_leave_in_a_loop())
        with joined(server, "127.0.4.7", name="marker"):  # presence comes in order: all came
            presence = []
            while not presence or '"joined": "marker"' not in presence[-1]:
                frame = watcher.recv(timeout=5)
                if json.loads(frame)["type"] == "presence":
                    presence.append(frame)
    cost = sum(len(frame.encode()) for frame in presence)
    assert cost <= presence_bytes_bound(took) < 11_000  # it was 275 KB a second
    assert refusals[0].status_code == 429 and refusals[0].headers["Retry-After"] == "1"
    assert b"connecting too often from your address" in refusals[0].body


def test_past_100_connections_an_address_is_refused_while_another_address_still_joins(server):
    async def run():
        clients = [await connect_from(server, "127.0.4.8") for _ in range(voices.MAX_PER_ADDRESS)]
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await connect_from(server, "127.0.4.8")
        async with connect_from(server, "127.0.4.9") as other:
            assert json.loads(await other.recv())["type"] == "history"
        for ws in clients:
            await ws.close()
        return refused.value.response

    refusal = run_async(run())
    assert refusal.status_code == 429
    assert b"100 websocket connections from your address are open already" in refusal.body

    def comes_back():
        with contextlib.suppress(websockets.exceptions.InvalidStatus), joined(server, "127.0.4.8"):
            return True  # once its join bucket lets it: the 100 were counted out
        return False

    wait_until(comes_back, what="the address getting in again once its connections closed")


def test_x_forwarded_for_of_a_handshake_from_anyone_but_the_proxy_is_ignored(
    proxied_server, monkeypatch
):
    without_refill(monkeypatch)

    async def run():
        # two connections from 127.0.0.2 that claim two addresses: one address, one limit
        claims = [{"X-Forwarded-For": address} for address in ("198.51.100.7", "198.51.100.8")]
        stored = 0
        for n, claim in enumerate(claims):
            async with connect_from(
                proxied_server, "127.0.0.2", "/ws", additional_headers=claim
            ) as ws:
                stored += await send_and_wait_for_answers(ws, BURST, f"claim{n}")
        return stored

    assert run_async(run()) == BURST


def test_behind_the_proxy_two_forwarded_addresses_get_two_limits_on_websockets_and_http(
    proxied_server, monkeypatch
):
    without_refill(monkeypatch)

    async def run(forwarded_for, name):
        # through the proxy: every connection comes from 127.0.0.1
        claim = {"X-Forwarded-For": forwarded_for}
        async with connect_from(proxied_server, "127.0.0.1", "/ws", additional_headers=claim) as ws:
            return await send_and_wait_for_answers(ws, BURST, name)

    assert run_async(run("198.51.100.1", "one")) == BURST
    statuses = flood(proxied_server.port, ["198.51.100.1"], count=10)  # its HTTP posts share it
    assert statuses == [429] * 10
    assert run_async(run("198.51.100.2", "other")) == BURST  # not the limit of the first
    assert flood(proxied_server.port, ["198.51.100.3"], count=1) == [201]


def test_one_ipv6_64_is_one_voice_behind_the_proxy_on_http_and_websockets(
    proxied_server, monkeypatch
):
    without_refill(monkeypatch)
    # one machine makes up addresses in its /64 at will: a new one for each post
    statuses = flood(proxied_server.port, [f"2001:db8:1:2::{n:x}" for n in range(1, 61)], count=60)
    assert statuses == [201] * BURST + [429] * (60 - BURST)
    assert flood(proxied_server.port, ["2001:db8:1:3::1"], count=1) == [201]  # the next /64

    async def run():
        claims = [{"X-Forwarded-For": f"2001:db8:1:4::{n}"} for n in (1, 2)]
        stored = 0
        for n, claim in enumerate(claims):
            async with connect_from(
                proxied_server, "127.0.0.1", "/ws", additional_headers=claim
            ) as ws:
                stored += await send_and_wait_for_answers(ws, BURST, f"v6-{n}")
        return stored

    assert run_async(run()) == BURST


def test_a_rename_refused_for_going_too_fast_keeps_the_name_and_says_retry_after(server):
    with joined(server, name="n0") as (ws, _):
        for n in range(1, 41):  # twice the burst, at once
            rename(ws, f"n{n}")
        error = receive(ws, "error")
    assert error["error"] == "rename refused: too many messages too fast: wait a second"
    assert error["name"] == "n20"  # the burst of 20 went through, and the room knows the last
    assert 0 < error["retry_after"] <= 1 / PER_SECOND
