"""The same error logged once: a log message repeats at most once every LOG_EVERY seconds.

Guarantees: log_repeated_errors_once() may be called any number of times (the filter is added
once); it touches only the loggers of waitress, asyncio, the websocket server and the chat's
own ("chat": a full --store disk logged a line per refused message).
"""

import logging
import time

LOG_EVERY = 10  # seconds; the same error is logged at most once in this time


class OncePerInterval(logging.Filter):
    """Lets each log message through once every LOG_EVERY seconds.

    When descriptors run out, accept() fails at once each time it is tried: waitress and
    asyncio then log a traceback per try, megabytes a second, which helps nobody.
    """

    def __init__(self):
        super().__init__()
        self.last_logged = {}

    def filter(self, record):
        now, key = time.monotonic(), (record.name, record.msg)
        if now - self.last_logged.get(key, float("-inf")) < LOG_EVERY:
            return False
        self.last_logged[key] = now
        return True


ONCE_PER_INTERVAL = OncePerInterval()


def log_repeated_errors_once():
    """A logger's filter sees only what is logged to that logger, not to its children: so
    "waitress.queue" too, whose "Task queue depth is 1" came with every request that waited
    a moment for one of waitress's threads (many a second in a busy room)."""
    for name in ("waitress", "waitress.queue", "asyncio", "websockets.server", "chat"):
        logging.getLogger(name).addFilter(ONCE_PER_INTERVAL)  # adding it again changes nothing
