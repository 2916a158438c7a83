"""gunicorn server hooks for poolwatch's multi-worker mode.

Use as the config (``gunicorn -c python:poolwatch.gunicorn ...``) or import the hooks into your own
config file (``from poolwatch.gunicorn import on_starting, child_exit``). Set
``POOLWATCH_MULTIPROC_DIR`` (or ``PROMETHEUS_MULTIPROC_DIR``) to a directory private to this
service, on a local (tmpfs is ideal) file system.

- ``on_starting`` (master, once): creates the directory and removes poolwatch files of earlier runs.
- ``child_exit`` (master, after reaping a worker): marks the worker's file dead at once, so its
  gauges disappear from the next scrape while its counters keep counting. Also calls
  prometheus_client's ``mark_process_dead`` when ``PROMETHEUS_MULTIPROC_DIR`` is set, which its
  own multiprocess mode needs anyway.
"""

from __future__ import annotations

import os
from typing import Any

from ._serve.multiprocess import clear_directory, mark_process_dead, multiprocess_directory

worker_class = "uvicorn.workers.UvicornWorker"


def on_starting(server: Any) -> None:
    directory = multiprocess_directory()
    if directory is None:
        server.log.warning("poolwatch: POOLWATCH_MULTIPROC_DIR is not set; each worker reports only itself")
        return
    clear_directory(directory)


def child_exit(server: Any, worker: Any) -> None:
    mark_process_dead(worker.pid)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
