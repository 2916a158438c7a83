"""Multi-worker servers: every worker's scrape reports the whole service.

prometheus_client's multiprocess mode keeps each metric value in an mmap file and cannot run custom
collectors, and poolwatch's gauges are read from the live pool at scrape time, so poolwatch shares
*collected output* instead:

- Each worker runs its own collector (the same one as single-process) off the hot path, every
  ``POOLWATCH_MULTIPROC_INTERVAL_SECONDS`` (default 1) and at each of its own scrapes, and writes the
  families as JSON to ``<dir>/poolwatch-<registry>-<pid>.json`` atomically (temporary file, then
  ``os.replace``), only when something changed.
- The scraped worker uses its own families fresh and merges every other file of the same *service
  instance* (same supervisor: parent pid and the parent's start time): counters and histograms are
  summed over all workers, dead ones included (what a dead worker counted still happened, and sums
  never go backwards); gauges come from live workers only, summed (so worker threads and their
  capacity add up over the workers), except the oldest checkout age, ``poolwatch_pool_info`` and
  the server's connection limit, which take the maximum.
- A worker is live while its pid exists, is not a zombie, started when its file says, and its file
  is not marked dead (gunicorn's ``child_exit`` hook and the worker's own exit mark it).

``<dir>`` is ``POOLWATCH_MULTIPROC_DIR``, else ``PROMETHEUS_MULTIPROC_DIR``; unset means
single-process mode. prometheus_client only reads ``*.db`` files there, so both can share it.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from .._log import internal_errors

PREFIX = "poolwatch-"
FORMAT_VERSION = 1
# Gauges whose service-wide value is the largest worker's, not the sum.
# The server's connection limit is the same server read by each worker: summing would multiply it.
MAX_GAUGES = frozenset(
    {"poolwatch_oldest_checkout_age_seconds", "poolwatch_pool_info", "poolwatch_server_connections_max"}
)

Document = dict[str, Any]


def multiprocess_directory() -> Path | None:
    """The shared directory as the settings read it (for gunicorn's master, which has no PoolWatch)."""
    from .._settings import build_settings

    return build_settings({}).multiproc_dir


# -- processes ------------------------------------------------------------------------------------


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, Linux), to tell a reused pid from the original."""
    stat = _proc_stat(pid)
    return int(stat[19]) if stat is not None else None


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def process_alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: the signal check is all there is
    if stat[0] in ("Z", "X"):  # exited, not yet reaped by its supervisor
        return False
    return started is None or int(stat[19]) == started


def service_group() -> list[int | None]:
    """This worker's service instance: its supervisor's pid and start time."""
    parent = os.getppid()
    return [parent, process_start(parent)]


# -- files ----------------------------------------------------------------------------------------


def _file_name(key: str, pid: int) -> str:
    return f"{PREFIX}{key}-{pid}.json"


_temporary_numbers = itertools.count()


def write_temporary(path: Path, data: bytes) -> Path:
    """``data`` in a new file beside ``path``, ready for ``os.replace``. The name is unique per call,
    so a write re-entered on the same thread (from a garbage-collector finalizer) never shares it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{next(_temporary_numbers)}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
    return temporary


def write_atomically(path: Path, data: bytes) -> None:
    os.replace(write_temporary(path, data), path)


def read_documents(directory: Path, key: str) -> Iterator[tuple[Path, Document]]:
    for path in sorted(directory.glob(f"{PREFIX}{key}-*.json")):
        try:
            document = json.loads(path.read_bytes())
        except FileNotFoundError:
            continue  # removed between listing and reading
        except (OSError, ValueError) as error:
            internal_errors.record("multiprocess_read", error)
            continue
        if isinstance(document, dict) and document.get("version") == FORMAT_VERSION:
            yield path, document


def mark_process_dead(pid: int, directory: str | os.PathLike[str] | None = None) -> None:
    """Mark a worker's files dead: its gauges stop counting, its counters keep counting.

    Call it from the supervisor when a worker exits (``poolwatch.gunicorn`` does, in ``child_exit``).
    """
    where = Path(directory) if directory is not None else multiprocess_directory()
    if where is None:
        return
    for path in where.glob(f"{PREFIX}*-{pid}.json"):
        try:
            document = json.loads(path.read_bytes())
            if document.get("pid") != pid or document.get("dead"):
                continue
            document["dead"] = True
            write_atomically(path, json.dumps(document, separators=(",", ":")).encode())
        except Exception as error:  # called from the supervisor's hook: never raise there
            internal_errors.record("multiprocess_mark_dead", error)


def clear_directory(directory: str | os.PathLike[str] | None = None) -> None:
    """Remove every poolwatch file: call it when the whole service (re)starts."""
    where = Path(directory) if directory is not None else multiprocess_directory()
    if where is None:
        return
    where.mkdir(parents=True, exist_ok=True)
    for path in [*where.glob(f"{PREFIX}*.json"), *where.glob(f".{PREFIX}*.tmp")]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- (de)serialising collected families -----------------------------------------------------------


def to_document(families: Iterable[Metric], group: list[int | None], dead: bool) -> Document:
    pid = os.getpid()
    return {
        "version": FORMAT_VERSION,
        "pid": pid,
        "start": process_start(pid),
        "group": group,
        "dead": dead,
        "families": [
            {
                "name": family.name,
                "type": family.type,
                "help": family.documentation,
                "unit": family.unit,
                "samples": [
                    [
                        sample.name,
                        sample.labels,
                        sample.value,
                        None
                        if sample.exemplar is None
                        else [sample.exemplar.labels, sample.exemplar.value, sample.exemplar.timestamp],
                    ]
                    for sample in family.samples
                ],
            }
            for family in families
        ],
    }


class _Merged:
    """Families merged sample by sample, in the order samples were first seen."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        self.values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]]] = {}

    def add(self, name: str, kind: str, documentation: str, unit: str, samples: Iterable[Any],
            live: bool) -> None:  # fmt: skip
        if kind == "gauge" and not live:
            return
        if name not in self.families:
            self.families[name] = Metric(name, documentation, kind, unit)
            self.values[name] = {}
        values = self.values[name]
        take_max = name in MAX_GAUGES
        for sample_name, labels, value, exemplar in samples:
            key = (sample_name, tuple(sorted(labels.items())))
            slot = values.get(key)
            if slot is None:
                values[key] = [sample_name, labels, value, exemplar]
                continue
            slot[2] = max(slot[2], value) if take_max else slot[2] + value
            if exemplar is not None and (slot[3] is None or _newer(exemplar, slot[3])):
                slot[3] = exemplar

    def metrics(self) -> Iterator[Metric]:
        for name, family in self.families.items():
            for sample_name, labels, value, exemplar in self.values[name].values():
                family.add_sample(sample_name, labels, value, exemplar=_exemplar(exemplar))
            yield family


def _newer(candidate: Any, current: Any) -> bool:
    return bool((_timestamp_of(candidate) or 0) > (_timestamp_of(current) or 0))


def _timestamp_of(exemplar: Any) -> float | None:
    if isinstance(exemplar, Exemplar):
        return None if exemplar.timestamp is None else float(exemplar.timestamp)
    return None if exemplar[2] is None else float(exemplar[2])


def _exemplar(value: Any) -> Exemplar | None:
    if value is None or isinstance(value, Exemplar):
        return value
    labels, observed, timestamp = value
    return Exemplar(labels, observed, timestamp)


# -- the worker's side ----------------------------------------------------------------------------


Collected = tuple[int, list[Metric]]


class Publisher:
    """Writes one worker's collected families to its file, periodically and on demand.

    Two threads publish (this one's own, every interval, and any scrape), so the file only ever moves
    forward: each collection is numbered in the same critical section that collects it, and a
    collection is written only if it is newer than the one in the file. Without that, a collection
    taken before a scrape's but written after it put the file back by up to an interval of counts.

    The locks are re-entrant, and nothing on SQLAlchemy's checkin path takes them: ``collect()``
    allocates, so a garbage collection inside it may check a leaked connection in on this very
    thread, through poolwatch's pool hooks (recorder only) and SQLAlchemy's; and anything run by a
    collection that does reach a publisher (a finalizer closing a PoolWatch) re-enters instead of
    waiting on itself. The re-entered, newer publication wins; the interrupted one is then older
    and is dropped.
    """

    def __init__(self, local: Collector, directory: Path, key: str, interval: float) -> None:
        self.local = local
        self.directory = directory
        self.key = key
        self.interval = interval
        self._collect_lock = threading.RLock()
        self._write_lock = threading.RLock()
        self._collections = 0  # numbers collections, under _collect_lock
        self._written = 0  # the number of the collection in the file, under _write_lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: bytes | None = None
        self._pid = -1
        self.group: list[int | None] = []
        self._closed = False
        _publishers.add(self)
        self.start()

    @property
    def path(self) -> Path:
        return self.directory / _file_name(self.key, os.getpid())

    def start(self) -> None:
        """Start (or, in a forked child, restart) the writer thread for this process."""
        if self._closed:
            return
        self._pid = os.getpid()
        self.group = service_group()
        self._last = None
        self._written = 0
        # After a fork the parent's other threads are gone, and so is any lock one of them held.
        self._collect_lock = threading.RLock()
        self._write_lock = threading.RLock()
        self._stop = threading.Event()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="poolwatch-multiprocess", daemon=True)
        self._thread.start()

    def collect(self) -> Collected:
        """This worker's families now, numbered: a higher number is a later collection."""
        with self._collect_lock:
            self._collections += 1
            return self._collections, list(self.local.collect())

    def publish(self, collected: Collected | None = None, *, dead: bool = False) -> None:
        """Write a collection (a fresh one by default) unless the file already holds a newer one."""
        number, families = self.collect() if collected is None else collected
        data = json.dumps(to_document(families, self.group, dead), separators=(",", ":")).encode()
        with self._write_lock:
            if number <= self._written:
                return
            if data != self._last:
                path = self.path
                temporary = write_temporary(path, data)
                if number <= self._written:  # a newer one re-entered while we wrote: it stands
                    temporary.unlink()
                    return
                os.replace(temporary, path)
                self._last = data
            self._written = number

    def close(self) -> None:
        """Stop publishing; the file stays, marked dead, so its counters still count."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        _publishers.discard(self)
        if self._pid == os.getpid():
            try:
                self.publish(dead=True)
            except Exception as error:
                internal_errors.record("multiprocess_publish", error)

    def _run(self) -> None:
        try:
            self._remove_stale_instances()
        except Exception as error:  # a directory that cannot be listed: publish all the same
            internal_errors.record("multiprocess_stale", error)
        while True:
            try:
                self.publish()
            except Exception as error:
                internal_errors.record("multiprocess_publish", error)
            if self._stop.wait(self.interval):
                return

    def _remove_stale_instances(self) -> None:
        """Drop files left by service instances whose supervisor is gone (an earlier run)."""
        for path, document in read_documents(self.directory, self.key):
            try:
                group = document.get("group") or [None, None]
                if group == self.group or group[0] is None:
                    continue
                if not process_alive(int(group[0]), group[1]):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            except Exception as error:  # a file not of our making, or one we may not remove
                internal_errors.record("multiprocess_stale", error)

    def after_fork_in_child(self) -> None:
        # The thread did not survive the fork, and this is a new pid with its own file.
        self.start()


_publishers: weakref.WeakSet[Publisher] = weakref.WeakSet()


def _close_all() -> None:
    for publisher in list(_publishers):
        publisher.close()


def _restart_all_after_fork() -> None:
    for publisher in list(_publishers):
        try:
            publisher.after_fork_in_child()
        except Exception as error:
            internal_errors.record("multiprocess_fork", error)


atexit.register(_close_all)
os.register_at_fork(after_in_child=_restart_all_after_fork)


# -- the scraped side -----------------------------------------------------------------------------


class MultiProcessCollector(Collector):
    """This worker's families, fresh, merged with every other worker of the same service."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def collect(self) -> Iterator[Metric]:
        collected = self.publisher.collect()
        try:
            yield from self._merge(collected)
        except Exception as error:
            internal_errors.record("multiprocess_collect", error)
            yield from collected[1]

    def _merge(self, collected: Collected) -> Iterator[Metric]:
        publisher = self.publisher
        local = collected[1]
        try:
            publisher.publish(collected)
        except Exception as error:
            internal_errors.record("multiprocess_publish", error)
        merged = _Merged()
        for family in local:
            merged.add(
                family.name, family.type, family.documentation, family.unit,
                ([s.name, s.labels, s.value, s.exemplar] for s in family.samples), live=True,
            )  # fmt: skip
        own = os.getpid()
        for _, document in read_documents(publisher.directory, publisher.key):
            pid = document.get("pid")
            if not isinstance(pid, int) or pid == own or document.get("group") != publisher.group:
                continue
            live = not document.get("dead") and process_alive(pid, document.get("start"))
            for family in document.get("families", ()):
                merged.add(
                    family["name"], family["type"], family["help"], family["unit"],
                    family["samples"], live,
                )  # fmt: skip
        yield from merged.metrics()
