"""What the chat tells a client it refuses, and whether sending the same again can cure it.

Guarantees: every refusal is a BadInput (a 400, or an error frame) whose message says the rule;
only TooFast and RoomUnavailable carry a `retry_after`, for a failure that passes. Nothing else
here: every other module raises these, and none needs more than this one to do it.
"""

RETRY_AFTER = 1  # seconds a client waits before sending again what the room could not take now


class BadInput(ValueError):
    """A client sent something the contract does not allow; the message says the rule."""

    retry_after = None  # a refusal: the same frame sent again would be refused again


class TooFast(BadInput):
    """More than the burst of messages at once, or more than the rate a second for long.

    Not a refusal for good: the same message goes through once the limit allows one more,
    `retry_after` seconds from now (the error frame says so, and the page waits that long).
    """

    def __init__(self, retry_after):
        super().__init__("too many messages too fast: wait a second")
        self.retry_after = retry_after


class NameTaken(BadInput):
    """Someone at another address goes by this name in the room."""

    def __init__(self, name):
        super().__init__(f"the name {name!r} is taken: someone else in the room goes by it")


class RoomUnavailable(Exception):
    """The room cannot store messages right now (with --redis: Redis is away; or the loop is
    too busy): a transient failure, so the client may send the same message again."""

    retry_after = RETRY_AFTER
