"""deploy/: the systemd unit passes systemd-analyze, and runs a command line chat.py accepts on
the ports nginx.conf uses.
"""

import re
import shlex
import subprocess
import sys

import chat

# isort: split
import pytest

from tests.helpers import CHAT_PY, PUBLIC, ROOM_KEY, needed_program

DEPLOY = CHAT_PY.with_name("deploy")


UNIT = DEPLOY / "chat@.service"


def environment_file(path):
    """The KEY=VALUE lines of a systemd EnvironmentFile (no quotes are used in ours)."""
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def unit_command_line(environment):
    """The unit's ExecStart as systemd runs it: ${NAME} is one word, $NAME splits into words."""
    (line,) = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    words = []
    for word in shlex.split(line.removeprefix("ExecStart=")):
        if one := re.fullmatch(r"\$\{(\w+)\}", word):
            words.append(environment[one[1]])
        elif split := re.fullmatch(r"\$(\w+)", word):
            words += environment[split[1]].split()
        else:
            assert "$" not in word, f"a variable inside a word, which this test cannot read: {word}"
            words.append(word)
    return words


def test_systemd_unit_passes_systemd_analyze_verify_and_security(tmp_path):
    analyze = needed_program("systemd-analyze", "systemd")
    unit = UNIT.read_text()  # with the chat where it is here, so that its ExecStart exists
    for installed, here in [
        ("/opt/chat/venv/bin/python", sys.executable),
        ("/opt/chat", CHAT_PY.parent),
    ]:
        assert installed in unit
        unit = unit.replace(installed, str(here))
    (tmp_path / UNIT.name).write_text(unit)
    for check in [["verify"], ["security", "--offline=yes", "--threshold=20"]]:
        result = subprocess.run(
            [analyze, *check, str(tmp_path / "chat@1.service")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert check != ["verify"] or result.stderr == ""  # unknown keys are only warned about


@pytest.mark.parametrize("instance", ["1", "2"])
def test_systemd_unit_command_line_is_one_chat_py_accepts_on_the_ports_nginx_uses(
    instance, monkeypatch
):
    environment = {
        **environment_file(DEPLOY / "chat" / "chat.env"),
        **environment_file(DEPLOY / "chat" / f"{instance}.env"),
        "CHAT_KEY": ROOM_KEY,  # as docs/online.md has it put there
    }
    python, script, *arguments = unit_command_line(environment)
    assert (python, script) == ("/opt/chat/venv/bin/python", "/opt/chat/chat.py")
    assert ROOM_KEY not in " ".join(arguments)  # in the environment, out of `ps`
    monkeypatch.setenv("CHAT_KEY", ROOM_KEY)  # as systemd gives it, from the EnvironmentFile
    args = chat.parse_args(arguments)
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert f"server 127.0.0.1:{args.port} " in nginx
    assert f"server 127.0.0.1:{args.ws_port} " in nginx
    assert args.redis == "redis://127.0.0.1:6379/0" and args.public_url == PUBLIC
    assert args.key == ROOM_KEY
    more = {**environment, "CHAT_ARGS": "--history 5000"}
    assert chat.parse_args(unit_command_line(more)[2:]).history == 5000
