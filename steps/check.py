"""Step 0: is this machine ready for the workshop? Run it before anything else:

    python steps/check.py

One line per item, and what to do about each one that is not ready; exit status 0 only when
all is ready. It uses the standard library alone: it must run before anything is installed."""

import argparse
import contextlib
import importlib
import importlib.metadata
import operator
import re
import socket
import sys
import warnings
from pathlib import Path

REQUIREMENTS = Path(__file__).parent.parent / "requirements.txt"
ACTIVATE = (  # the README's way in, macOS/Linux and Windows (PowerShell)
    "make one (python -m venv .venv; Windows: py -m venv .venv), then activate it in every "
    r"new terminal: . .venv/bin/activate (Windows: .venv\Scripts\Activate.ps1)"
)
INSTALL = "python -m pip install -r requirements.txt"
COMPARE = {"==": operator.eq, ">=": operator.ge, "<=": operator.le, "<": operator.lt}
COMPARE.update({">": operator.gt, "!=": operator.ne})  # not |=: an old Python must run this too


def check_python():
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info >= (3, 11):  # noqa: UP036 (this runs on any Python, to say it is too old)
        return True, f"Python {version}"
    return False, f"Python {version} is too old: install 3.11 or newer, and make the venv with it"


def check_venv():
    if sys.prefix != sys.base_prefix:
        return True, f"virtual environment active: {sys.prefix}"
    return False, f"no virtual environment is active: {ACTIVATE}"


def requirements(path):
    """(distribution, [(operator, version)]) for each line of requirements.txt that applies here."""
    for line in path.read_text(encoding="utf-8").splitlines():
        line, _, marker = line.split("#", 1)[0].partition(";")
        if line.strip() and applies(marker):
            name, *specifiers = re.split(r"\s*,\s*|(?=[<>=!])", line.strip(), maxsplit=1)
            pairs = re.findall(r"(==|>=|<=|!=|<|>)\s*([\w.]+)", ",".join(specifiers))
            yield name.strip(), pairs


def applies(marker):
    """An environment marker such as python_version>="3.12" (the only kind requirements.txt has)."""
    found = re.fullmatch(r'\s*python_version\s*(==|>=|<=|!=|<|>)\s*"([\d.]+)"\s*', marker)
    if not marker.strip():
        return True
    if not found:
        raise ValueError(f"check.py cannot read this environment marker: {marker.strip()}")
    return COMPARE[found[1]](sys.version_info[:2], version_tuple(found[2]))


def version_tuple(text):
    return tuple(int(part) for part in re.findall(r"\d+", text))


def check_requirement(name, pairs):
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False, f"{name} is not installed: {INSTALL}"
    wanted = ",".join(op + wanted for op, wanted in pairs)
    if not all(COMPARE[op](version_tuple(version), version_tuple(v)) for op, v in pairs):
        return False, f"{name} {version} is installed, {wanted} is needed: {INSTALL}"
    module = top_level_module(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 (whatever stops the import is what to report)
        why = f"{type(error).__name__}: {error}".splitlines()[0]
        return False, f"{name} {version} does not import ({why}): in a fresh venv, {INSTALL}"
    return True, f"{name} {version}"


def top_level_module(name):
    """The module a distribution installs: hug is hug, legacy-cgi is cgi."""
    files = importlib.metadata.files(name) or []
    modules = [re.sub(r"\.py$", "", f.parts[0]) for f in files if f.suffix == ".py"]
    by_name = name.lower().replace("-", "_")
    return by_name if by_name in modules else min(modules, key=len, default=by_name)


def check_port(port, what):
    with socket.socket() as probe:
        if sys.platform != "win32":  # as the servers do: a port just freed is free
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False, (
                f"port {port} ({what}) is in use: stop what runs there (a step or chat.py in "
                f"another terminal? Ctrl+C there), or give the steps other ports"
            )
    return True, f"port {port} ({what}) is free"


def check_lan():
    """Not needed for the steps: only for a workshop room, where others join your chat."""
    found = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))  # sends nothing: only picks the route out
        found.append(probe.getsockname()[0])
    with contextlib.suppress(OSError):
        found += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
    lan = [a for a in dict.fromkeys(found) if not a.startswith(("127.", "::1", "fe80"))]
    if not lan:
        return True, "LAN address: none (only this machine reaches your chat; fine for the steps)"
    return True, "LAN addresses: " + ", ".join(lan) + " (others open http://ADDRESS:8000/)"


def main():
    parser = argparse.ArgumentParser(description="Is this machine ready for the workshop?")
    parser.add_argument("--requirements", type=Path, default=REQUIREMENTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=8000, help="the HTTP port to check")
    parser.add_argument("--ws-port", type=int, default=8765, help="the websocket port to check")
    args = parser.parse_args()
    checks = [check_python(), check_venv()]
    if sys.version_info >= (3, 11):  # noqa: UP036 (older: the requirements cannot install)
        checks += [
            check_requirement(name, pairs) for name, pairs in requirements(args.requirements)
        ]
    checks += [check_port(args.port, "HTTP"), check_port(args.ws_port, "websockets"), check_lan()]
    for ready, line in checks:
        print(f"{'ok  ' if ready else 'FIX '} {line}", flush=True)
    ready = all(ready for ready, _ in checks)
    print("Ready." if ready else "Not ready yet: fix the lines marked FIX, then run this again.")
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
