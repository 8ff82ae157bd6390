"""The command line keeps its word: the URLs it prints, and every bad flag, port or address
is one line on stderr and exit status 2.
"""

import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import CHAT_PY, request


def test_prints_the_page_and_websocket_urls_with_real_ports(chat_process):
    process = chat_process("--port", "0", "--ws-port", "0")
    page, websocket = process.urls()
    assert page.startswith("Chat page:  http://127.0.0.1:") and page.endswith("/\n")
    assert websocket.startswith("Websocket:  ws://127.0.0.1:")
    assert process.port > 0 and process.ws_port > 0
    assert request(process.port, "GET", "/health")[0] == 200


@pytest.mark.parametrize("which", ["--port", "--ws-port"])
def test_port_in_use_is_one_line_and_exit_2(chat_process, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        other = "--ws-port" if which == "--port" else "--port"
        process = chat_process(which, str(taken.getsockname()[1]), other, "0")
        assert process.process.wait(15) == 2
        error = process.process.stderr.read()
    assert error.count("\n") == 1 and "in use" in error and "Traceback" not in error


@pytest.mark.parametrize(
    "args", [["--port", "http"], ["--port", "70000"], ["--history", "0"], ["--bogus"]]
)
def test_bad_flag_is_one_line_and_exit_2(chat_process, args):
    process = chat_process(*args)
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and error.startswith("chat.py: error:")


def test_a_host_that_does_not_resolve_is_one_line_and_exit_2(chat_process):
    process = chat_process("--host", "999.1.1.1", "--port", "0", "--ws-port", "0")
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and error.startswith("chat.py: error:") and "999.1.1.1" in error


def test_host_0_0_0_0_prints_addresses_people_can_open_never_0_0_0_0(chat_process):
    process = chat_process("--host", "0.0.0.0", "--port", "0", "--ws-port", "0")
    page, websocket = process.urls()  # the first two lines, as tools read them
    lines = [page, websocket]
    while not lines[-1].startswith("Websocket:  ws://127.0.0.1:"):  # loopback comes last
        lines.append(process.lines.get(timeout=5))
    assert "0.0.0.0" not in "".join(lines)
    key = f"?key={process.key}"  # a room key: strangers can reach this chat
    assert lines[-2:] == [
        f"Chat page:  http://127.0.0.1:{process.port}/{key}\n",
        f"Websocket:  ws://127.0.0.1:{process.ws_port}/{key}\n",
    ]
    for page_line, ws_line in zip(lines[::2], lines[1::2], strict=True):
        address = page_line.split("//")[1].split(":")[0]
        assert page_line == f"Chat page:  http://{address}:{process.port}/{key}\n"
        assert ws_line == f"Websocket:  ws://{address}:{process.ws_port}/{key}\n"
        assert (
            request(process.port, "GET", "/health", headers={"Host": f"{address}:{process.port}"})[
                0
            ]
            == 200
        )


@pytest.mark.parametrize(
    "args",
    [
        ["--public-url", "https://chat.example.org/chat/"],
        ["--public-url", "chat.example.org"],
        ["--public-url", "https://x:port"],
        ["--allow-host", "chat.lan:8000"],
        ["--allow-host", "http://chat.lan"],
    ],
)
def test_a_bad_public_url_or_allow_host_is_one_line_and_exit_2(chat_process, args):
    process = chat_process(*args)
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and error.startswith(f"chat.py: error: argument {args[0]}")


@pytest.mark.parametrize("url", ["localhost:6379", "redis://[::1", "redis://127.0.0.1:99999/0"])
def test_a_redis_url_that_is_no_redis_url_is_one_line_and_exit_2(chat_process, url):
    pytest.importorskip("redis")
    process = chat_process("--port", "0", "--ws-port", "0", "--redis", url)
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and "is not a Redis URL" in error and "Traceback" not in error


def test_an_empty_store_file_name_is_one_line_and_exit_2(chat_process):
    process = chat_process("--port", "0", "--ws-port", "0", "--store", "")
    assert process.process.wait(15) == 2
    error = process.process.stderr.read()
    assert error.count("\n") == 1 and error.startswith("chat.py: error: argument --store")


def test_a_chat_whose_output_nobody_reads_stops_instead_of_hanging():
    """`python chat.py | head -2`: once head is gone, printing fails; the servers must stop
    with it, or their threads keep the process alive and deaf to Ctrl+C."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the chat's first print fails
    try:
        process = subprocess.Popen(
            [sys.executable, str(CHAT_PY), "--port", "0", "--ws-port", "0"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write_end)
    try:
        assert process.wait(15) == 1
    finally:
        process.kill()
        process.wait()
        error = process.stderr.read()
        process.stderr.close()
    assert (
        error.startswith("chat.py: error: standard output was closed") and "Traceback" not in error
    )
