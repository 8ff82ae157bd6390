"""Stopping: clients get 1001, no thread or socket is left behind, and stop() waits for nobody."""

import asyncio
import contextlib
import signal
import socket
import time

import chat

# isort: split
import pytest
import websockets
from websockets.asyncio.client import connect as async_connect
from websockets.sync.client import connect

from tests.helpers import (
    close_code,
    joined,
    open_fds,
    post,
    receive,
    run_async,
    running_servers,
    seed_big,
    silent_client,
    stalled_resume,
)


def test_stop_closes_clients_with_1001_and_leaves_no_thread_or_socket():
    fds_before = open_fds()
    with running_servers() as servers, joined(servers) as (ws, _):  # it checks the threads
        post(servers.port, "/messages", {"text": "hi"})
        servers.stop()
        assert close_code(ws) == 1001
    assert open_fds() <= fds_before


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_both_servers_clients_get_1001_exit_0(chat_process, stop_signal):
    process = chat_process("--port", "0", "--ws-port", "0")
    process.urls()
    with connect(f"ws://127.0.0.1:{process.ws_port}/", open_timeout=5) as ws:
        receive(ws, "history")
        process.process.send_signal(stop_signal)
        assert close_code(ws) == 1001
    assert process.process.wait(5) == 0
    assert "Traceback" not in process.process.stderr.read()


def test_stop_closes_a_handshake_that_never_comes_instead_of_waiting_for_it(monkeypatch):
    monkeypatch.setattr(chat, "OPEN_TIMEOUT", 60)  # far longer than stop() may take
    with (
        running_servers() as servers,
        socket.create_connection(("127.0.0.1", servers.ws_port), timeout=10) as idle,
    ):
        # connections are accepted in order: once a later one is in, the idle one is too
        with joined(servers) as (ws, _):
            servers.stop()  # RoomUnavailable if the loop still waited for the idle one
            assert close_code(ws) == 1001
        assert idle.recv(1) == b""  # closed by the server


def test_sigterm_under_load_stops_within_5_seconds_with_1001_and_exit_0(chat_process):
    process = chat_process("--port", "0", "--ws-port", "0")
    process.urls()
    codes = []

    async def client(n, started):
        async with async_connect(
            f"ws://127.0.0.1:{process.ws_port}/?name=load{n}", max_queue=None
        ) as ws:
            started.append(n)
            try:
                while True:
                    await ws.send(f"load {n}")  # 8 a second: under the rate limit
                    with contextlib.suppress(TimeoutError):
                        while True:
                            await asyncio.wait_for(ws.recv(), 0.125)
            except websockets.exceptions.ConnectionClosed as closed:
                codes.append(closed.rcvd.code if closed.rcvd else None)

    async def run():
        started = []
        # will not answer the close
        silent = await asyncio.to_thread(silent_client, process.ws_port)
        tasks = [asyncio.create_task(client(n, started)) for n in range(20)]
        while len(started) < 20:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)  # messages are flowing
        begun = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        exit_code = await asyncio.to_thread(process.process.wait, 10)
        silent.close()
        return exit_code, time.monotonic() - begun

    exit_code, took = run_async(run())
    assert exit_code == 0 and took < 5
    assert codes == [1001] * 20


def test_stop_does_not_wait_for_a_client_that_stopped_reading_its_history():
    with running_servers(history=2000) as servers:
        seed_big(2000)
        with stalled_resume(servers):  # its close frame would wait behind a piece it never reads
            began = time.monotonic()
            servers.stop()  # waiting for it would give up at 6 s, and SIGTERM hang with --store
            assert time.monotonic() - began < 5
