"""A forked child sweeps for leaks too (gunicorn ``--preload`` forks workers after the engines exist).

The child inherits the sweeper and its pools but not its thread; without a thread of its own a
connection held too long in a worker would be counted only when it comes back, never while out.
The pool here is a real QueuePool over fake DBAPI connections, so the child shares no socket.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._capture.pool_hooks import recorder_of
from tests.fake_dbapi import engine_for_test

THRESHOLD = 0.05
# The child gives the sweeper this long (its interval is 0.25 s): a deadline, far above both.
CHILD_DEADLINE = 10.0


def test_a_forked_child_flags_a_leak_while_the_connection_is_out() -> None:
    with engine_for_test(pool_size=1, max_overflow=0) as (engine, _):
        watch = poolwatch.watch(
            engine, registry=CollectorRegistry(), name="forked", leak_threshold_seconds=THRESHOLD
        )
        recorder = recorder_of(engine.pool)
        assert recorder is not None
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only, never through pytest
            status = 1
            try:
                connection = engine.pool.connect()
                deadline = time.monotonic() + CHILD_DEADLINE
                while time.monotonic() < deadline and not recorder.leaked_records:
                    time.sleep(0.01)
                status = 0 if recorder.leaked_records else 2
                connection.close()
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        watch.close()
    assert os.waitstatus_to_exitcode(status) == 0, "the child never flagged the connection it held"
