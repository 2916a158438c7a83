"""The leak sweeper: flags long-held checkouts even when nothing scrapes.

One daemon thread for the process, started when the first pool with leak detection is watched and
ended when the last one is released, so it never keeps a process alive and costs nothing idle.

A forked child (gunicorn ``--preload`` forks workers after the app, and its engines, were made)
inherits the sweeper but not its thread: the child starts a thread of its own for the pools it
inherited, with a fresh lock, since the parent's thread may have held the old one at the fork.
"""

from __future__ import annotations

import os
import threading
import weakref

from .._log import internal_errors
from .recorder import PoolRecorder

# A checkout is flagged at most this long after it crosses the threshold.
SWEEP_INTERVAL_SECONDS = 0.25


class LeakSweeper:
    def __init__(self, interval: float = SWEEP_INTERVAL_SECONDS) -> None:
        self._interval = interval
        self._recorders: weakref.WeakSet[PoolRecorder] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, recorder: PoolRecorder) -> None:
        if recorder.leak_threshold <= 0:
            return
        with self._lock:
            self._recorders.add(recorder)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="poolwatch-leak-sweeper", daemon=True)
                self._thread.start()

    def discard(self, recorder: PoolRecorder) -> None:
        with self._lock:
            self._recorders.discard(recorder)
            if not self._recorders:
                self._wake.set()

    def after_fork_in_child(self) -> None:
        """Only the forking thread exists in the child: start sweeping there again if needed."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        if len(self._recorders):
            self._thread = threading.Thread(target=self._run, name="poolwatch-leak-sweeper", daemon=True)
            self._thread.start()

    def sweep_now(self) -> None:
        for recorder in list(self._recorders):
            try:
                recorder.sweep()
            except Exception as error:
                internal_errors.record("leak_sweep", error)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            with self._lock:
                # Decided under the lock that add() takes, so a pool added now is never orphaned.
                if not self._recorders:
                    self._thread = None
                    return
                self._wake.clear()
            self.sweep_now()


sweeper = LeakSweeper()


def _restart_after_fork() -> None:
    try:
        sweeper.after_fork_in_child()
    except Exception as error:
        internal_errors.record("leak_sweep_fork", error)


os.register_at_fork(after_in_child=_restart_after_fork)
