"""The websocket server's sockets: what a connection may hold in the kernel, whose voice an
address is on a LAN, handshakes for paths that are no URL, and the event loop it runs on."""

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_chat import CHAT_PY, raw_handshake, running_servers, tracebacks, wait_for_health

ROOT = CHAT_PY.parent


# --- A handshake for a path that is no URL path ------------------------------------------


@pytest.fixture(params=[None, "the-room-key"], ids=["no-key", "key"])
def either_server(request):
    with running_servers(key=request.param) as servers:
        yield servers


@pytest.mark.parametrize("path", ["//[x", "http://[::1", "//[::1/", "//][", "//x]", "ws://[::1"])
def test_a_handshake_for_a_path_that_is_no_url_is_a_400_not_a_500(either_server, caplog, path):
    status, body = raw_handshake(either_server.ws_port, [("Host", "127.0.0.1")], path)
    assert status in (400, 404), body
    assert tracebacks(caplog) == []


@pytest.mark.timeout(120)
def test_fuzzed_handshake_paths_never_get_a_500_or_a_traceback(either_server, caplog):
    pieces = st.sampled_from(["/", "//", "[", "]", "::1", ":", "@", "?", "#", "%", "x", "chat"])
    paths = st.lists(pieces | st.text("/[]:@?#%=&.;x1", max_size=6), max_size=8).map("".join)

    @settings(max_examples=100, deadline=None, database=None)
    @given(st.sampled_from(["", "/", "http://", "ws://127.0.0.1"]), paths)
    def check(prefix, path):
        status, _ = raw_handshake(either_server.ws_port, [("Host", "127.0.0.1")], prefix + path)
        assert status < 500
        assert tracebacks(caplog) == []

    check()
    wait_for_health(either_server.port, clients=0)


# --- The event loop: asyncio's own, whatever hug found installed -------------------------

FAKE_UVLOOP = '''
"""Stands for uvloop, as `import hug` sees it: a policy whose loops are of another class."""
import asyncio


class Loop(asyncio.SelectorEventLoop):
    pass


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return Loop()
'''

WHICH_LOOP = """
import asyncio
import chat

servers = chat.Servers("127.0.0.1", 0, 0)
try:
    print(type(asyncio.get_event_loop_policy()).__module__)  # what hug set
    print(type(servers.loop).__module__, type(servers.loop).__name__)  # what the chat runs on
finally:
    servers.stop()
"""


@pytest.mark.timeout(60)
def test_the_chat_runs_on_asyncios_own_loop_when_uvloop_can_be_imported(tmp_path):
    (tmp_path / "uvloop.py").write_text(FAKE_UVLOOP)
    run = subprocess.run(
        [sys.executable, "-c", WHICH_LOOP],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    policy, loop = run.stdout.splitlines()
    assert policy == "uvloop"  # hug found the fake and set its policy, as it would uvloop's
    assert loop.split()[0] in ("asyncio.unix_events", "asyncio.windows_events")
