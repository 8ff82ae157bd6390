"""The rules: what a text, a name, a ref, since and limit may be.

Guarantees: each clean_*() returns the value as the room takes it, or raises BadInput (from
parts/errors.py) naming the field and the rule; nothing else gets through. A text or a name is
a string of 1 to MAX_TEXT or MAX_NAME characters once trimmed, valid Unicode; a name is also
what parts/names.py allows. hug uses the clean_*() as types too, so HTTP and the websocket
refuse the same things. whole_number() never hands int() more digits than its bound has.
"""

import sys
import unicodedata

from parts import names
from parts.errors import BadInput

MAX_TEXT = 2000  # characters, after trimming white space
MAX_NAME = 32
MAX_REF = 64  # characters of a client's own id for a message (see Room.post)


def clean_text(value):
    """The text of a message."""
    return trimmed(value, "text", MAX_TEXT)


def clean_name(value):
    """A display name as parts/names.py allows and stores it: the PRECIS nickname rules,
    Unicode's emoji sequences, 1 to MAX_NAME characters. NFC first, so "é" is one character
    however it was typed."""
    if isinstance(value, str):
        value = unicodedata.normalize("NFC", value)
    name = trimmed(value, "name", MAX_NAME)
    try:
        name = names.checked(name)
    except ValueError as error:
        raise BadInput(str(error)) from None
    if len(name) > MAX_NAME:  # NFKC can lengthen a name: "\ufdfa" becomes 18 letters
        raise BadInput(f"name is longer than {MAX_NAME} characters")
    return name


def clean_ref(value):
    """A client's own id for a message, or None: the page sends it again after a reconnect."""
    if value is None:
        return None
    if not is_ref(value):
        raise BadInput(f"ref must be a string of 1 to {MAX_REF} characters")
    return value


def clean_since(value):
    """Id of the last message the client has: None when absent, else a whole number of 0 or
    more (a string from a query string, or a number from a JSON body)."""
    if value is None:
        return None
    since = whole_number(str(value), 0, 10**100 - 1)  # any id a client could hold, and more
    if since is None:
        raise BadInput("since must be a whole number of 0 or more")
    return since


def clean_limit(value):
    """How many messages at most: 1 to 1000."""
    limit = whole_number(str(value), 1, 1000)
    if limit is None:
        raise BadInput("limit must be a whole number from 1 to 1000")
    return limit


# --- The rules' own helpers --------------------------------------------------------------


def trimmed(value, field, limit):
    """A string of 1 to `limit` characters once white space is trimmed from its ends."""
    if not isinstance(value, str):
        raise BadInput(f"{field} must be a string")
    value = value.strip()
    if not value:
        raise BadInput(f"{field} is empty")
    if len(value) > limit:
        raise BadInput(f"{field} is longer than {limit} characters")
    try:
        value.encode("utf-8")  # JSON can carry a lone surrogate ("\ud800"); UTF-8 cannot
    except UnicodeEncodeError:
        raise BadInput(f"{field} is not valid Unicode") from None
    return value


def is_ref(value):
    return isinstance(value, str) and 1 <= len(value) <= MAX_REF


def whole_number(text, low, high):
    """`text` as a whole number from `low` to `high`, else None (for clean_since(),
    clean_limit() and the command line's numbers).

    isdecimal() refuses "-1", "1.5" and "²" (isdigit() would pass "²" on to int()), and the
    length bound keeps int() away from its limit of 4300 digits.
    """
    if text.isdecimal() and len(text) <= len(str(high)) and low <= int(text) <= high:
        return int(text)
    return None


def json_limit(error):
    """What a JSON text that json.loads() refuses for a limit, not for its syntax, is past."""
    if isinstance(error, RecursionError):
        return "it is nested too deep"
    return f"a number has more than {sys.get_int_max_str_digits()} digits"
