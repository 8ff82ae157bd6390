"""The command line, and the Settings that Servers runs with.

Guarantees: parse_args() gives a Settings or exits with argparse's usage error naming the
option and the rule (a port is 0 to 65535, --history a whole number of 1 or more, --store a
file name, --allow-host, --public-url and --key as parts/access.py allows them); the room key
is chosen as parts/access.py says (choose_room_key()). Settings' defaults are the command
line's.
"""

import argparse
import dataclasses

from parts import access
from parts.rules import whole_number


@dataclasses.dataclass
class Settings:
    """What Servers runs with: the command line's options (parse_args()), or a test's."""

    host: str = "127.0.0.1"  # the address both servers bind
    port: int = 8000  # HTTP; 0 for any free one
    ws_port: int = 8765  # websockets; 0 for any free one
    history: int = 1000  # messages the room keeps
    redis: str | None = None  # the URL of the Redis that keeps the room (parts/redis_history.py)
    store: str | None = None  # the SQLite file that keeps the history (parts/sqlite_history.py)
    allow_host: list = dataclasses.field(default_factory=list)  # host names besides the usual
    public_url: str | None = None  # https://... through a reverse proxy on this machine
    key: str | None = None  # the room key; None where no stranger reaches the chat
    no_key: bool = False  # no key even where strangers can reach the chat
    open: bool = False  # open the page in the browser
    max_clients: int = 10_000  # websocket connections at most; fewer if descriptors are fewer


# --- The command line --------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="chat.py", usage=argparse.SUPPRESS, description="A real-time chat: hug + websockets."
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address both servers bind (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=port_argument, default=8000, help="HTTP port, 0 for any free one"
    )
    parser.add_argument(
        "--ws-port", type=port_argument, default=8765, help="websocket port, 0 for any free one"
    )
    parser.add_argument(
        "--history", type=count_argument, default=1000, help="messages the room keeps"
    )
    parser.add_argument("--open", action="store_true", help="open the chat page in the browser")
    parser.add_argument(
        "--redis", metavar="URL", help="keep the room in Redis, shared by several chat.py"
    )
    parser.add_argument(
        "--store",
        metavar="FILE",
        type=file_argument,
        help="keep the history in this SQLite file, over restarts",
    )
    parser.add_argument(
        "--allow-host",
        metavar="NAME",
        type=access.host_name_argument,
        action="append",
        default=[],
        help="a host name the chat answers to, besides IP addresses, localhost, *.localhost "
        "and this machine's name (repeatable)",
    )
    parser.add_argument(
        "--public-url",
        metavar="URL",
        type=access.public_url_argument,
        help="the https:// URL people reach the chat at, through a reverse proxy on this machine",
    )
    parser.add_argument(
        "--key",
        type=access.room_key_argument,
        help="the room key people need, so a restart keeps the link (default: $CHAT_KEY, else a "
        "new random one when --host is not loopback or with --public-url; the same one for "
        "every --redis process)",
    )
    parser.add_argument(
        "--no-key",
        action="store_true",
        help="no room key even where strangers can reach the chat: anyone who can reach it is in",
    )
    args = parser.parse_args(argv)
    access.choose_room_key(parser, args)
    return Settings(**vars(args))


def port_argument(value):
    port = whole_number(value, 0, 65535)
    if port is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0 to 65535)")
    return port


def file_argument(value):
    """Not empty: --store "" (an unset variable in a unit file) kept nothing, without a word."""
    if not value:
        raise argparse.ArgumentTypeError("give a file name, such as chat.db")
    return value


def count_argument(value):
    count = whole_number(value, 1, 999_999_999)
    if count is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of 1 or more")
    return count
