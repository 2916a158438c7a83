"""Say so, once, when a multi-worker server runs without the shared directory.

Under ``gunicorn -w N``, ``uvicorn --workers N`` or ``fastapi run --workers N`` each worker has its
own pool, and without ``POOLWATCH_MULTIPROC_DIR`` each worker's ``/metrics`` reports only itself:
Prometheus' scrapes land on whichever worker the kernel picks, so the numbers silently flip between
workers. Nothing is wrong from the application's side, so this is a warning event, never an error.

The server is recognised from the main thread's stack rather than from command lines. A worker of
either server runs its whole life on its main thread below the object that knows the worker count:
gunicorn forks each worker inside ``Arbiter.spawn_worker``, which never returns in the child, and
every uvicorn process that serves (single process, a reload child, a worker of its multiprocess
supervisor, which receives the whole ``Config``) runs inside ``Server.run``. So the count is right
however it was given: a flag, a gunicorn config file, ``WEB_CONCURRENCY``, ``GUNICORN_CMD_ARGS`` or
``uvicorn.run(workers=4)``. Only frames of ``gunicorn.arbiter`` and ``uvicorn.server`` are looked
into. Other servers are not recognised, and the check runs once per process, at start-up.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from .._log import internal_errors, logger

if TYPE_CHECKING:
    from .._settings import PoolWatchSettings

SETTING = "POOLWATCH_MULTIPROC_DIR"


@dataclass(frozen=True)
class Server:
    name: str  # "gunicorn" or "uvicorn"
    workers: int


# The process that has already decided: once per process, and a forked child decides afresh.
_decided_in: int | None = None
_decide_lock = threading.Lock()


def warn_if_multiworker(settings: PoolWatchSettings) -> None:
    """Log ``poolwatch.multiworker_without_directory`` once per process if it applies; never raises."""
    global _decided_in
    try:
        if settings.multiproc_dir is not None:
            return
        pid = os.getpid()
        with _decide_lock:
            if _decided_in == pid:
                return
            _decided_in = pid
        server = running_server()
        if server is None or server.workers < 2:
            return
        logger.warning(
            "poolwatch.multiworker_without_directory",
            server=server.name,
            workers=server.workers,
            pid=pid,
            setting=SETTING,
            hint=f"each worker's /metrics reports only that worker; set {SETTING} to a directory "
            "private to this service so that any worker reports them all",
        )
    except Exception as error:
        internal_errors.record("multiworker_check", error)


def running_server(frames: Iterable[FrameType] | None = None) -> Server | None:
    """The gunicorn or uvicorn server this process serves in, with its worker count, if any."""
    uvicorn: Server | None = None
    for frame in main_thread_frames() if frames is None else frames:
        module = frame.f_globals.get("__name__")
        if module == "gunicorn.arbiter":
            workers = getattr(frame.f_locals.get("self"), "num_workers", None)
            if isinstance(workers, int):
                # Outranks uvicorn: gunicorn's uvicorn worker class runs a one-worker uvicorn Server.
                return Server("gunicorn", workers)
        elif module == "uvicorn.server" and uvicorn is None:
            config = getattr(frame.f_locals.get("self"), "config", None)
            workers = getattr(config, "workers", None)
            if isinstance(workers, int):
                # With --reload uvicorn ignores --workers and serves in one process.
                reloading = getattr(config, "should_reload", False) is True
                uvicorn = Server("uvicorn", 1 if reloading else workers)
    return uvicorn


def main_thread_frames() -> Iterator[FrameType]:
    """The main thread's frames, innermost first, from whichever thread asks."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    while frame is not None:
        yield frame
        frame = frame.f_back
