"""Defects a hostile client still finds on this main, each as a test that fails on it.

Each is marked xfail(strict=True) until its fix lands: then it passes, the mark goes, and
the test moves to the file of its behaviour.
Source addresses are loopback addresses (127.0.0.0/8 is all this machine).
"""

import asyncio
import contextlib
import time

import pytest

from tests.helpers import (
    ask_room,
    silent_client,
    the_room,
    unsent_in_closed_sockets,
    wait_until,
)


@pytest.mark.timeout(60)
@pytest.mark.xfail(
    strict=True,
    reason="a non-reader dropped with transport.abort() leaves an orphan socket in FIN-WAIT-1 "
    "that keeps its unsent bytes (up to 2 x SEND_BUFFER) in the kernel after the drop; the "
    "client can come straight back and hold another",
)
def test_a_dropped_non_reader_leaves_nothing_queued_in_the_kernel(server):
    big = {"type": "message", "id": 0, "name": "x", "text": "x" * 2000}

    async def flood_until_dropped():
        for _ in range(2000):  # 4 MB: past MAX_QUEUED and the kernel's buffer
            if "silent" not in the_room().clients.values():
                return True
            the_room().send_to_all(big)
            await asyncio.sleep(0)
        return False

    with contextlib.closing(silent_client(server.ws_port)):
        wait_until(lambda: "silent" in the_room().clients.values(), what="silent in the room")
        assert ask_room(flood_until_dropped()), "the non-reader was not dropped"
        time.sleep(2)  # the kernel has had time to send, or to give up
        assert unsent_in_closed_sockets(server.ws_port) == 0
