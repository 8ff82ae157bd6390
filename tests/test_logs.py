"""The log stays readable: the same error again and again is logged once per interval."""

import concurrent.futures
import logging
import os
import threading

from parts import logs

# isort: split

from tests.helpers import request, wait_until


def test_the_same_error_again_and_again_is_logged_once_per_interval(caplog):
    logs.log_repeated_errors_once()
    token = os.urandom(4).hex()  # a message no earlier test logged
    for _ in range(100):
        logging.getLogger("waitress").warning(f"server accept() threw an exception {token}")
    logging.getLogger("asyncio").error(f"socket.accept() out of system resource {token}")
    assert [r.getMessage() for r in caplog.records if token in r.getMessage()] == [
        f"server accept() threw an exception {token}",
        f"socket.accept() out of system resource {token}",
    ]


def test_waitress_task_queue_warnings_come_once_per_interval_not_per_request(
    server, caplog, monkeypatch
):
    monkeypatch.setattr(logs.ONCE_PER_INTERVAL, "last_logged", {})  # as if nothing logged yet
    busy = threading.Event()
    server.loop.call_soon_threadsafe(busy.wait, 10)  # the loop is busy: requests wait for it
    with concurrent.futures.ThreadPoolExecutor(12) as clients:
        # from 12 addresses: one address gets only two answers written at a time
        answers = [
            clients.submit(request, server.port, "GET", "/health", source=f"127.0.5.{n}")
            for n in range(1, 13)
        ]
        queue = server.http_server.task_dispatcher.queue
        wait_until(lambda: len(queue) >= 6, what="requests queued for waitress's threads")
        busy.set()
        assert [answer.result().status for answer in answers] == [200] * 12
    warnings = [r for r in caplog.records if r.getMessage().startswith("Task queue depth is")]
    assert len(warnings) == 1
