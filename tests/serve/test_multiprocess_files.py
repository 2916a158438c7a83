"""The multi-worker files, in this process: what a worker writes, what a scrape merges, and who
counts as alive.

Everything in ``poolwatch._serve.multiprocess`` that tests/test_multiworker.py reaches only through
real gunicorn and uvicorn workers is driven here in the pytest process, so mutation testing sees
it: the atomic writes and the reading of other workers' files (bad ones skipped and counted), a
document's round trip, the liveness of a pid (running, exited, a zombie, reused), the supervisor's
``mark_process_dead`` and ``clear_directory``, the publisher (its file at start, its writer thread,
newer collections only, closing, failures, stale service instances) and the merged scrape (counters
of every worker, gauges of live ones, the newest exemplar). Other workers are files in ``tmp_path``
naming real processes: a ``sleep`` child for a live one, a reaped child for a dead one, an unreaped
one for a zombie. Pools, where one is needed, are real engines on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar, Sample

import poolwatch
from poolwatch._log import internal_errors
from poolwatch._serve import multiprocess
from poolwatch._serve.multiprocess import (
    MultiProcessCollector,
    Publisher,
    clear_directory,
    mark_process_dead,
    process_alive,
    process_start,
    read_documents,
    service_group,
    to_document,
    write_atomically,
    write_temporary,
)
from tests.metrics import scrape

KEY = "k"
SLEEP = shutil.which("sleep") or "/bin/sleep"
TRUE = shutil.which("true") or "/bin/true"
SampleKey = tuple[str, frozenset[tuple[str, str]]]


# -- helpers ----------------------------------------------------------------------------------------


def _family(
    name: str, kind: str, samples: list[tuple[str, dict[str, str], float, Any]], *, unit: str = ""
) -> Metric:
    family = Metric(name, f"{name} help", kind, unit)
    for sample_name, labels, value, exemplar in samples:
        family.add_sample(sample_name, labels, value, exemplar=exemplar)
    return family


def _jobs_and_busy(jobs: float, busy: float, exemplar: Any = None) -> list[Metric]:
    """A worker's numbers: a counter (with an optional exemplar) and a gauge."""
    return [
        _family("jobs", "counter", [("jobs_total", {"queue": "q"}, jobs, exemplar)]),
        _family("busy", "gauge", [("busy", {"queue": "q"}, busy, None)]),
    ]


class Families(Collector):
    """This worker's own collector: families built anew at each collection from ``make``."""

    def __init__(self, make: Callable[[], list[Metric]]) -> None:
        self.make = make

    def collect(self) -> Iterator[Metric]:
        yield from self.make()


class Counts(Families):
    """A local collector whose counter and gauge the test sets."""

    def __init__(self, jobs: float = 1, busy: float = 1, exemplar: Any = None) -> None:
        self.jobs, self.busy, self.exemplar = jobs, busy, exemplar
        super().__init__(lambda: _jobs_and_busy(self.jobs, self.busy, self.exemplar))


def _write_worker(
    directory: Path,
    pid: Any,
    families: list[Metric],
    *,
    group: list[int | None],
    key: str = KEY,
    dead: bool = False,
    start: Any = "own",
    name: str | None = None,
) -> Path:
    """Another worker's file, as that worker would have written it (to_document, then its pid)."""
    document = to_document(families, group, dead)
    document["pid"] = pid
    document["start"] = process_start(pid) if start == "own" else start
    path = directory / f"poolwatch-{key}-{name if name is not None else pid}.json"
    path.write_text(json.dumps(document))
    return path


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition was never met"
        time.sleep(0.005)


def _started(publisher: Publisher) -> Publisher:
    """The publisher, once its thread has written its first file."""
    _wait_for(publisher.path.exists)
    return publisher


def _document(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_bytes())
    return document


def _published(path: Path, sample: str) -> float:
    return float(
        sum(
            value
            for family in _document(path)["families"]
            for name, _, value, _ in family["samples"]
            if name == sample
        )
    )


def _is_compact_json(path: Path) -> bool:
    data = path.read_bytes()
    return data == json.dumps(json.loads(data), separators=(",", ":")).encode()


def _merged(publisher: Publisher) -> dict[SampleKey, Sample]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample
        for family in MultiProcessCollector(publisher).collect()
        for sample in family.samples
    }


def _value(samples: dict[SampleKey, Sample], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))].value


def _temporaries(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp"))


def _stamp(path: Path) -> tuple[int, int]:
    """Which file is at ``path``: a rewrite is a new inode (os.replace) with a new mtime."""
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    return _identity(path)


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _seconds_since_start(start: int) -> float:
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start / os.sysconf("SC_CLK_TCK")


def _default_signals() -> None:
    for number in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_DFL)


@pytest.fixture
def processes() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts child processes (``sleep 60`` unless told) and kills and reaps them afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*command: str) -> subprocess.Popen[bytes]:
        # Default signal dispositions, whatever this run inherited (nohup ignores SIGHUP): a
        # check that sent a signal by mistake must be seen to end the child.
        process = subprocess.Popen(list(command) or [SLEEP, "60"], preexec_fn=_default_signals)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([TRUE])
    process.wait()
    return process.pid


@pytest.fixture
def zombie(processes: Callable[..., subprocess.Popen[bytes]]) -> int:
    """The pid of a process that has exited and that nobody has reaped yet."""
    process = processes(TRUE)
    _wait_for(lambda: Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
    return process.pid


@pytest.fixture
def publishers() -> Iterator[Callable[..., Publisher]]:
    """Makes publishers, each waited for until its first file is written, and closes them after."""
    made: list[Publisher] = []

    def make(local: Collector, directory: Path, key: str = KEY, interval: float = 3600) -> Publisher:
        publisher = Publisher(local, directory, key, interval)
        made.append(publisher)
        return _started(publisher)

    yield make
    for publisher in made:
        publisher.close()


# -- files ------------------------------------------------------------------------------------------


def test_an_atomic_write_puts_the_data_in_place_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "poolwatch-k-1.json"
    target.write_bytes(b"old")
    write_atomically(target, b'{"new":1}')
    assert target.read_bytes() == b'{"new":1}'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["poolwatch-k-1.json"]


def test_each_temporary_file_is_new_hidden_beside_its_target_and_cleared_with_the_directory(
    tmp_path: Path,
) -> None:
    target = tmp_path / "poolwatch-k-1.json"
    first = write_temporary(target, b"one")
    second = write_temporary(target, b"two")
    assert first != second
    for temporary in (first, second):
        assert temporary.parent == tmp_path
        assert temporary.name.startswith(f".poolwatch-k-1.json.{os.getpid()}.")
        assert temporary.name.endswith(".tmp")
    assert (first.read_bytes(), second.read_bytes()) == (b"one", b"two")
    assert not target.exists()
    # A write that died before its os.replace leaves a temporary that a restart clears.
    clear_directory(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_documents_are_read_for_one_key_in_name_order(tmp_path: Path) -> None:
    for name in ("poolwatch-k-3.json", "poolwatch-k-1.json", "poolwatch-k-2.json", "poolwatch-kk-4.json",
                 "poolwatch-other-5.json", "poolwatch-k-6.db"):  # fmt: skip
        (tmp_path / name).write_text(json.dumps({"version": 1, "name": name}))
    found = [(path.name, document["name"]) for path, document in read_documents(tmp_path, KEY)]
    assert found == [
        ("poolwatch-k-1.json", "poolwatch-k-1.json"),
        ("poolwatch-k-2.json", "poolwatch-k-2.json"),
        ("poolwatch-k-3.json", "poolwatch-k-3.json"),
    ]


def test_unreadable_documents_are_skipped_and_counted_and_vanished_ones_skipped_silently(
    tmp_path: Path,
) -> None:
    (tmp_path / "poolwatch-k-1.json").symlink_to(tmp_path / "gone")  # removed after the listing
    (tmp_path / "poolwatch-k-2.json").write_text("{not json")
    (tmp_path / "poolwatch-k-3.json").mkdir()  # not a file at all
    (tmp_path / "poolwatch-k-4.json").write_text(json.dumps({"version": 2}))  # another format
    (tmp_path / "poolwatch-k-5.json").write_text(json.dumps(["version", 1]))  # not a document
    (tmp_path / "poolwatch-k-6.json").write_text(json.dumps({"pid": 6}))  # no version
    (tmp_path / "poolwatch-k-7.json").write_text(json.dumps({"version": 1, "pid": 7}))
    errors_before = internal_errors.count
    found = [(path.name, document) for path, document in read_documents(tmp_path, KEY)]
    assert found == [("poolwatch-k-7.json", {"version": 1, "pid": 7})]
    assert internal_errors.count == errors_before + 2  # the bad JSON and the directory


def test_a_document_holds_this_process_its_service_group_and_its_families(tmp_path: Path) -> None:
    seen = Exemplar({"trace_id": "t1"}, 0.25, 1_700_000_000.5)
    families = [
        _family("jobs", "counter", [("jobs_total", {"queue": "q"}, 3.0, seen),
                                    ("jobs_created", {"queue": "q"}, 10.0, None)]),
        _family("wait_seconds", "gauge", [("wait_seconds", {}, 1.5, None)], unit="seconds"),
    ]  # fmt: skip
    document = to_document(families, [41, 42], True)
    own_start = process_start(os.getpid())
    assert own_start is not None
    assert document == {
        "version": 1,
        "pid": os.getpid(),
        "start": own_start,
        "group": [41, 42],
        "dead": True,
        "families": [
            {"name": "jobs", "type": "counter", "help": "jobs help", "unit": "",
             "samples": [["jobs_total", {"queue": "q"}, 3.0, [{"trace_id": "t1"}, 0.25, 1_700_000_000.5]],
                         ["jobs_created", {"queue": "q"}, 10.0, None]]},
            {"name": "wait_seconds", "type": "gauge", "help": "wait_seconds help", "unit": "seconds",
             "samples": [["wait_seconds", {}, 1.5, None]]},
        ],
    }  # fmt: skip
    assert to_document(families, [41, 42], False)["dead"] is False


def test_a_worker_file_round_trips_into_the_scrape_family_by_family(
    tmp_path: Path,
    processes: Callable[..., subprocess.Popen[bytes]],
    publishers: Callable[..., Publisher],
) -> None:
    def mine() -> list[Metric]:
        return [_family("queue_wait_seconds", "gauge", [("queue_wait_seconds", {"queue": "q"}, 0.5, None)],
                        unit="seconds")]  # fmt: skip

    def theirs() -> list[Metric]:
        return [
            _family("request_seconds", "counter",
                    [("request_seconds_total", {"route": "/a"}, 7.0, Exemplar({"trace_id": "ab"}, 0.3, 1_700_000_001.0)),
                     ("request_seconds_created", {"route": "/a"}, 1_600_000_000.0, None)], unit="seconds"),
            _family("latency", "histogram",
                    [("latency_bucket", {"le": "0.1"}, 2.0, Exemplar({"trace_id": "cd"}, 0.05, None)),
                     ("latency_bucket", {"le": "+Inf"}, 3.0, None),
                     ("latency_count", {}, 3.0, None), ("latency_sum", {}, 0.4, None)]),
            _family("build", "info", [("build_info", {"version": "1.2"}, 1.0, None)]),
        ]  # fmt: skip

    publisher = publishers(Families(mine), tmp_path)
    worker = processes()
    _write_worker(tmp_path, worker.pid, theirs(), group=publisher.group)
    got = [
        (f.name, f.type, f.documentation, f.unit, f.samples)
        for f in MultiProcessCollector(publisher).collect()
    ]
    want = [(f.name, f.type, f.documentation, f.unit, f.samples) for f in [*mine(), *theirs()]]
    assert got == want


# -- processes --------------------------------------------------------------------------------------


def test_a_running_process_is_alive_and_asking_sends_it_no_signal(
    processes: Callable[..., subprocess.Popen[bytes]],
) -> None:
    worker = processes()
    start = process_start(worker.pid)
    assert start is not None
    assert process_alive(worker.pid, start) is True
    assert process_alive(worker.pid, None) is True  # no start time known: the pid is enough
    time.sleep(0.05)
    assert worker.poll() is None


def test_an_exited_process_is_dead_whether_reaped_or_a_zombie(dead_pid: int, zombie: int) -> None:
    assert process_alive(dead_pid, None) is False
    assert process_start(dead_pid) is None
    assert process_alive(zombie, None) is False
    assert process_alive(zombie, process_start(zombie)) is False


def test_a_pid_held_by_a_process_that_started_at_another_time_is_dead(
    processes: Callable[..., subprocess.Popen[bytes]],
) -> None:
    worker = processes()
    start = process_start(worker.pid)
    assert start is not None
    assert process_alive(worker.pid, start - 1) is False
    assert process_alive(worker.pid, start + 1) is False


def test_a_start_time_is_the_clock_ticks_since_boot_even_past_a_name_with_parentheses(
    tmp_path: Path, processes: Callable[..., subprocess.Popen[bytes]]
) -> None:
    tricky = tmp_path / "a) Z 1 (b"  # the command name /proc shows in parentheses
    tricky.symlink_to(SLEEP)
    plain, odd = processes(), processes(str(tricky), "60")
    _wait_for(lambda: "(a) Z 1 (b)" in Path(f"/proc/{odd.pid}/stat").read_text())
    for worker in (plain, odd):
        start = process_start(worker.pid)
        assert start is not None
        assert -0.1 <= _seconds_since_start(start) < 30, start  # started just now
        assert process_alive(worker.pid, start) is True


def test_the_service_group_is_the_supervisor_pid_and_its_start_time() -> None:
    parent = os.getppid()
    assert service_group() == [parent, process_start(parent)]
    assert service_group()[1] is not None


# -- the supervisor's side --------------------------------------------------------------------------


def test_marking_a_pid_dead_rewrites_its_files_of_every_key_and_nothing_else(
    tmp_path: Path, dead_pid: int
) -> None:
    group: list[int | None] = [1, 2]
    families = _jobs_and_busy(5, 2)
    to_mark = [
        _write_worker(tmp_path, dead_pid, families, group=group, key=f"m{n}", start=123) for n in range(6)
    ]
    already_dead = [
        _write_worker(tmp_path, dead_pid, families, group=group, key=f"d{n}", start=123, dead=True)
        for n in range(3)
    ]
    not_its = [
        _write_worker(tmp_path, dead_pid + 1, families, group=group, key="o", start=123, name=str(dead_pid)),
        _write_worker(tmp_path, dead_pid + 1, families, group=group, key="o", start=123),
    ]
    before = {path: (path.read_bytes(), _stamp(path)) for path in [*already_dead, *not_its]}
    expected = {path: {**_document(path), "dead": True} for path in to_mark}
    mark_process_dead(dead_pid, tmp_path)
    for path in to_mark:
        assert _document(path) == expected[path]
        assert _is_compact_json(path)
    for path, (data, identity) in before.items():
        assert (path.read_bytes(), _identity(path)) == (data, identity), path.name
    assert _temporaries(tmp_path) == []


def test_marking_dead_counts_an_unreadable_file_and_marks_the_others(tmp_path: Path, dead_pid: int) -> None:
    (tmp_path / f"poolwatch-a-{dead_pid}.json").write_text("{not json")
    good = _write_worker(tmp_path, dead_pid, _jobs_and_busy(1, 1), group=[1, 2], key="b", start=None)
    errors_before = internal_errors.count
    mark_process_dead(dead_pid, tmp_path)
    assert internal_errors.count == errors_before + 1
    assert _document(good)["dead"] is True


def test_marking_dead_never_raises_for_a_file_not_of_our_making(tmp_path: Path, dead_pid: int) -> None:
    """The supervisor's hook must not fail for a stray file: a JSON array where a document should
    be is counted, and the worker's real file is still marked."""
    (tmp_path / f"poolwatch-a-{dead_pid}.json").write_text("[1, 2]")
    good = _write_worker(tmp_path, dead_pid, _jobs_and_busy(1, 1), group=[1, 2], key="b", start=None)
    errors_before = internal_errors.count
    mark_process_dead(dead_pid, tmp_path)
    assert internal_errors.count == errors_before + 1
    assert _document(good)["dead"] is True


def test_clearing_removes_every_poolwatch_file_and_temporary_and_nothing_else(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    clear_directory(directory)  # made when missing, parents too
    assert directory.is_dir() and list(directory.iterdir()) == []
    names = ["poolwatch-default-1.json", "poolwatch-r1-2.json", ".poolwatch-r1-2.json.2.0.tmp",
             "counter_1.db", "other.json", "poolwatch-notes.txt"]  # fmt: skip
    for name in names:
        (directory / name).write_text("x")
    clear_directory(directory)
    assert sorted(path.name for path in directory.iterdir()) == [
        "counter_1.db",
        "other.json",
        "poolwatch-notes.txt",
    ]


@pytest.mark.parametrize("variable", ["POOLWATCH_MULTIPROC_DIR", "PROMETHEUS_MULTIPROC_DIR"])
def test_without_a_directory_mark_and_clear_use_the_configured_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_pid: int, variable: str
) -> None:
    for name in ("POOLWATCH_MULTIPROC_DIR", "PROMETHEUS_MULTIPROC_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, str(tmp_path))
    path = _write_worker(tmp_path, dead_pid, _jobs_and_busy(1, 1), group=[1, 2], start=None)
    mark_process_dead(dead_pid)
    assert _document(path)["dead"] is True
    clear_directory()
    assert list(tmp_path.iterdir()) == []


def test_without_a_directory_anywhere_mark_and_clear_do_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_pid: int
) -> None:
    for name in ("POOLWATCH_MULTIPROC_DIR", "PROMETHEUS_MULTIPROC_DIR"):
        monkeypatch.delenv(name, raising=False)
    path = _write_worker(tmp_path, dead_pid, _jobs_and_busy(1, 1), group=[1, 2], start=None)
    mark_process_dead(dead_pid)
    clear_directory()
    assert _document(path)["dead"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# -- the worker's side: the publisher ---------------------------------------------------------------


def test_a_publisher_writes_its_file_at_start_in_a_directory_it_creates(
    tmp_path: Path, publishers: Callable[..., Publisher]
) -> None:
    directory = tmp_path / "shared" / "mp"
    publisher = publishers(Counts(jobs=4, busy=2), directory)
    assert publisher.path == directory / f"poolwatch-{KEY}-{os.getpid()}.json"
    assert sorted(directory.iterdir()) == [publisher.path]
    assert publisher.group == service_group()
    assert _document(publisher.path) == {
        **to_document(_jobs_and_busy(4, 2), service_group(), False),
    }
    assert _is_compact_json(publisher.path)
    # The writer thread never keeps the process from exiting.
    (writer,) = [
        t for t in threading.enumerate() if t.name == "poolwatch-multiprocess" and t is publisher._thread
    ]
    assert writer.daemon is True
    assert publisher in multiprocess._publishers


def test_the_writer_republishes_every_interval_but_only_what_changed(
    sync_url: str, tmp_path: Path, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    watch = poolwatch.watch(
        engine, registry=registry, name="app", multiproc_dir=tmp_path, multiproc_interval_seconds=0.02
    )
    try:
        publisher = watch._shared.publisher
        assert publisher is not None
        _started(publisher)
        for _ in range(3):
            engine.connect().close()
        # No scrape: the writer thread alone brings the file up to date.
        _wait_for(lambda: _published(publisher.path, "poolwatch_checkouts_total") == 3)
        assert _document(publisher.path)["dead"] is False
        identity = _stamp(publisher.path)
        time.sleep(0.3)  # fifteen intervals with nothing new
        assert _identity(publisher.path) == identity
        engine.connect().close()
        _wait_for(lambda: _published(publisher.path, "poolwatch_checkouts_total") == 4)
        assert _temporaries(tmp_path) == []
    finally:
        watch.close()
        engine.dispose()


def test_an_older_collection_never_replaces_a_newer_one_nor_is_one_written_twice(
    tmp_path: Path, publishers: Callable[..., Publisher]
) -> None:
    local = Counts(jobs=1)
    publisher = publishers(local, tmp_path)
    local.jobs = 2
    older = publisher.collect()
    local.jobs = 3
    newer = publisher.collect()
    assert newer[0] > older[0]
    publisher.publish(newer)
    publisher.publish(older)
    assert _published(publisher.path, "jobs_total") == 3
    publisher.publish(newer, dead=True)  # the same collection again: already in the file
    assert _document(publisher.path)["dead"] is False
    identity = _stamp(publisher.path)
    publisher.publish()  # a fresh collection with nothing new leaves the file alone
    assert _identity(publisher.path) == identity
    local.jobs = 4
    publisher.publish()
    assert _published(publisher.path, "jobs_total") == 4
    assert _temporaries(tmp_path) == []


def test_closing_leaves_the_file_marked_dead_and_stops_publishing(tmp_path: Path) -> None:
    local = Counts(jobs=1, busy=1)
    publisher = _started(Publisher(local, tmp_path, KEY, 0.02))
    thread = publisher._thread
    assert thread is not None
    local.jobs = 2
    publisher.close()
    assert _document(publisher.path)["dead"] is True
    assert _published(publisher.path, "jobs_total") == 2
    thread.join(5)
    assert not thread.is_alive()
    assert publisher not in multiprocess._publishers
    local.jobs = 3
    identity = _stamp(publisher.path)
    publisher.close()  # a second close writes nothing
    publisher.start()  # nor does a closed publisher start again
    time.sleep(0.1)
    assert _identity(publisher.path) == identity
    assert _published(publisher.path, "jobs_total") == 2


def test_a_failed_publication_is_counted_and_the_writer_keeps_going(tmp_path: Path) -> None:
    directory = tmp_path / "mp"
    local = Counts(jobs=1)
    publisher = _started(Publisher(local, directory, KEY, 0.02))
    try:
        shutil.rmtree(directory)
        errors_before = internal_errors.count
        local.jobs = 2
        _wait_for(lambda: internal_errors.count >= errors_before + 2)  # tried, and tried again
        directory.mkdir()
        _wait_for(publisher.path.exists)
        assert _published(publisher.path, "jobs_total") == 2
    finally:
        publisher.close()


def test_a_close_that_cannot_write_is_counted_not_raised(tmp_path: Path) -> None:
    directory = tmp_path / "mp"
    local = Counts(jobs=1)
    publisher = _started(Publisher(local, directory, KEY, 3600))
    shutil.rmtree(directory)
    local.jobs = 2
    errors_before = internal_errors.count
    publisher.close()
    assert internal_errors.count == errors_before + 1
    assert not directory.exists()


def test_at_start_files_of_service_instances_whose_supervisor_is_gone_are_removed(
    tmp_path: Path,
    dead_pid: int,
    processes: Callable[..., subprocess.Popen[bytes]],
    publishers: Callable[..., Publisher],
) -> None:
    supervisor = processes()
    started = process_start(supervisor.pid)
    assert started is not None
    families = _jobs_and_busy(1, 1)
    groups: dict[str, Any] = {
        "100": service_group(),  # this service instance
        "101": [None, None],  # no supervisor known
        "102": "absent",
        "103": [dead_pid, None],  # supervisor gone
        "104": [dead_pid, 12345],
        "105": [supervisor.pid, started],  # another service instance, still running
        "106": [supervisor.pid, started + 1],  # its supervisor's pid now held by another process
    }
    for name, group in groups.items():
        path = _write_worker(tmp_path, dead_pid, families, group=group, start=None, name=name)
        if group == "absent":
            document = _document(path)
            del document["group"]
            path.write_text(json.dumps(document))
    other_key = _write_worker(tmp_path, dead_pid, families, group=[dead_pid, None], key="other", start=None)
    errors_before = internal_errors.count
    publisher = publishers(Counts(), tmp_path)
    assert internal_errors.count == errors_before  # every one of them a file poolwatch can read
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [f"poolwatch-{KEY}-{name}.json" for name in ("100", "101", "102", "105")]
        + [other_key.name, publisher.path.name]
    )


def test_a_stale_file_with_a_malformed_group_is_counted_and_the_writer_still_publishes(
    tmp_path: Path, dead_pid: int, publishers: Callable[..., Publisher]
) -> None:
    """A file whose group cannot be read (not written by this version, or by hand) neither stops
    the writer thread nor keeps the other stale files: it is counted and left alone."""
    families = _jobs_and_busy(1, 1)
    odd = _write_worker(tmp_path, dead_pid, families, group=[123], start=None, name="odd")
    stale = _write_worker(tmp_path, dead_pid, families, group=[dead_pid, None], start=None, name="stale")
    errors_before = internal_errors.count
    publisher = publishers(Counts(), tmp_path)
    assert odd.exists() and not stale.exists()
    assert internal_errors.count == errors_before + 1
    assert publisher._thread is not None and publisher._thread.is_alive()


# -- the scraped side: merging ------------------------------------------------------------------------


def test_one_scrape_sums_every_workers_counters_and_the_live_workers_gauges_on_real_pools(
    sync_url: str,
    tmp_path: Path,
    registry: CollectorRegistry,
    dead_pid: int,
    processes: Callable[..., subprocess.Popen[bytes]],
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    elsewhere = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    watch = poolwatch.watch(
        engine, registry=registry, name="app", multiproc_dir=tmp_path, multiproc_interval_seconds=3600
    )
    other = poolwatch.watch(elsewhere, registry=CollectorRegistry(), name="app")
    held = [elsewhere.connect(), elsewhere.connect()]
    try:
        publisher = watch._shared.publisher
        other_collector = other.direct_collector
        assert publisher is not None and other_collector is not None
        _started(publisher)
        for _ in range(3):
            engine.connect().close()
        # Three other workers of the service, each with two connections held (older and older).
        first, second, third = (list(other_collector.collect()) for _ in range(3))
        _write_worker(tmp_path, processes().pid, first, group=publisher.group, key=publisher.key)
        _write_worker(tmp_path, processes().pid, second, group=publisher.group, key=publisher.key)
        _write_worker(tmp_path, dead_pid, third, group=publisher.group, key=publisher.key)  # exited
        oldest = [
            family.samples[0].value
            for family in second
            if family.name == "poolwatch_oldest_checkout_age_seconds"
        ]
        samples = scrape(registry)
        assert samples.value("poolwatch_checkouts_total", pool="app") == 3 + 2 + 2 + 2
        assert samples.value("poolwatch_connections", pool="app", state="used") == 0 + 2 + 2
        assert samples.value("poolwatch_connections", pool="app", state="idle") == 1 + 0 + 0
        assert samples.value("poolwatch_connections_max", pool="app") == 2 + 2 + 2
        # The largest, not the sum: the oldest checkout of a live worker, and one pool_info.
        assert [samples.value("poolwatch_oldest_checkout_age_seconds", pool="app")] == oldest
        assert oldest[0] > 0
        assert [value for _, value in samples.find("poolwatch_pool_info", pool="app")] == [1.0]
        # The scrape also published this worker's own numbers, at once (the interval is an hour).
        own = _published(publisher.path, "poolwatch_checkouts_total")
        assert own == 3
    finally:
        for connection in held:
            connection.close()
        watch.close()
        other.close()
        engine.dispose()
        elsewhere.dispose()


def test_liveness_decides_whose_gauges_count_and_every_counter_counts(
    tmp_path: Path,
    dead_pid: int,
    zombie: int,
    processes: Callable[..., subprocess.Popen[bytes]],
    publishers: Callable[..., Publisher],
) -> None:
    publisher = publishers(Counts(jobs=1, busy=1), tmp_path)
    live, unknown_start, reused, marked = (processes() for _ in range(4))
    reused_start = process_start(reused.pid)
    assert reused_start is not None
    group = publisher.group
    _write_worker(tmp_path, live.pid, _jobs_and_busy(2, 2), group=group)
    _write_worker(tmp_path, unknown_start.pid, _jobs_and_busy(4, 4), group=group, start=None)
    _write_worker(tmp_path, dead_pid, _jobs_and_busy(8, 8), group=group)
    _write_worker(tmp_path, zombie, _jobs_and_busy(16, 16), group=group)
    _write_worker(tmp_path, reused.pid, _jobs_and_busy(32, 32), group=group, start=reused_start + 1)
    _write_worker(tmp_path, marked.pid, _jobs_and_busy(64, 64), group=group, dead=True)
    samples = _merged(publisher)
    assert _value(samples, "jobs_total", queue="q") == 127
    assert _value(samples, "busy", queue="q") == 1 + 2 + 4
    # The supervisor saw the live worker exit: its gauges go, its counts stay.
    mark_process_dead(live.pid, tmp_path)
    samples = _merged(publisher)
    assert _value(samples, "jobs_total", queue="q") == 127
    assert _value(samples, "busy", queue="q") == 1 + 4


def test_a_gauge_only_dead_workers_reported_is_left_out(
    tmp_path: Path, dead_pid: int, publishers: Callable[..., Publisher]
) -> None:
    publisher = publishers(Families(list), tmp_path)
    _write_worker(tmp_path, dead_pid, _jobs_and_busy(5, 5), group=publisher.group)
    families = list(MultiProcessCollector(publisher).collect())
    assert [(f.name, [s.value for s in f.samples]) for f in families] == [("jobs", [5.0])]


def test_files_of_another_service_instance_another_registry_or_this_process_add_nothing(
    tmp_path: Path,
    processes: Callable[..., subprocess.Popen[bytes]],
    publishers: Callable[..., Publisher],
) -> None:
    publisher = publishers(Counts(jobs=1, busy=1), tmp_path)
    worker, stranger = processes(), processes()
    group = publisher.group
    _write_worker(
        tmp_path, str(worker.pid), _jobs_and_busy(100, 100), group=group, start=None, name="0"
    )  # pid not a number
    _write_worker(tmp_path, stranger.pid, _jobs_and_busy(200, 200), group=[stranger.pid, 1])
    _write_worker(tmp_path, worker.pid, _jobs_and_busy(400, 400), group=group, key="other")
    _write_worker(tmp_path, worker.pid, _jobs_and_busy(2, 2), group=group)  # the one that counts
    # A worker with nothing collected yet (no families at all) adds nothing, and is no error.
    empty = _write_worker(tmp_path, stranger.pid, [], group=group, name="1")
    document = _document(empty)
    del document["families"]
    empty.write_text(json.dumps(document))
    errors_before = internal_errors.count
    samples = _merged(publisher)
    # This worker's own numbers once (fresh, not again from its file), and the one other worker's.
    assert _value(samples, "jobs_total", queue="q") == 3
    assert _value(samples, "busy", queue="q") == 3
    assert internal_errors.count == errors_before


def test_a_malformed_worker_file_leaves_the_scrape_with_this_workers_own_numbers_counted(
    tmp_path: Path, processes: Callable[..., subprocess.Popen[bytes]], publishers: Callable[..., Publisher]
) -> None:
    publisher = publishers(Counts(jobs=1, busy=1), tmp_path)
    worker = processes()
    path = _write_worker(tmp_path, worker.pid, _jobs_and_busy(2, 2), group=publisher.group)
    document = _document(path)
    del document["families"][0]["help"]
    path.write_text(json.dumps(document))
    errors_before = internal_errors.count
    samples = _merged(publisher)
    assert internal_errors.count == errors_before + 1
    assert {key: sample.value for key, sample in samples.items()} == {
        ("jobs_total", frozenset({("queue", "q")})): 1.0,
        ("busy", frozenset({("queue", "q")})): 1.0,
    }


def test_a_scrape_whose_publication_fails_still_answers_and_counts_the_failure(tmp_path: Path) -> None:
    directory = tmp_path / "mp"
    local = Counts(jobs=1, busy=1)
    publisher = _started(Publisher(local, directory, KEY, 3600))
    try:
        shutil.rmtree(directory)
        local.jobs = 2
        errors_before = internal_errors.count
        samples = _merged(publisher)
        assert internal_errors.count == errors_before + 1
        assert _value(samples, "jobs_total", queue="q") == 2
    finally:
        publisher.close()


OLD, NEW = 1_700_000_000.0, 1_700_000_100.0


def _file_exemplar(name: str, timestamp: float | None) -> Exemplar:
    return Exemplar({"trace_id": name}, float(len(name)), timestamp)


@pytest.mark.parametrize(
    ("own", "files", "winner"),
    [
        pytest.param(None, [("a", OLD)], "a", id="any-exemplar-over-none"),
        pytest.param(None, [("a", OLD), ("bb", NEW)], "bb", id="a-newer-file-replaces"),
        pytest.param(None, [("a", NEW), ("bb", OLD)], "a", id="an-older-file-does-not"),
        pytest.param(None, [("a", None), ("bb", OLD)], "bb", id="a-timestamp-beats-none"),
        pytest.param(None, [("a", OLD), ("bb", None)], "a", id="none-never-beats-a-timestamp"),
        pytest.param(None, [("a", None), ("bb", None)], "a", id="no-timestamps-first-stays"),
        pytest.param(None, [("a", OLD), ("bb", OLD)], "a", id="a-tie-first-stays"),
        pytest.param(("own", NEW), [("a", OLD)], "own", id="own-newer-stays"),
        pytest.param(("own", OLD), [("a", NEW)], "a", id="own-older-replaced"),
        pytest.param(("own", None), [("a", OLD)], "a", id="own-without-timestamp-replaced"),
        pytest.param(("own", OLD), [("a", None)], "own", id="own-over-a-file-without-timestamp"),
        pytest.param(("own", OLD), [("a", OLD)], "own", id="own-on-a-tie"),
    ],
)
def test_the_newest_exemplar_wins_whoever_holds_it(
    tmp_path: Path,
    dead_pid: int,
    publishers: Callable[..., Publisher],
    own: tuple[str, float | None] | None,
    files: list[tuple[str, float | None]],
    winner: str,
) -> None:
    mine = None if own is None else _file_exemplar(*own)
    publisher = publishers(Counts(jobs=1, exemplar=mine), tmp_path)
    exemplars = {"own": mine}
    for number, (name, timestamp) in enumerate(files, start=1):
        exemplars[name] = _file_exemplar(name, timestamp)
        # Counters of exited workers count, exemplars too; files are read in name order.
        _write_worker(
            tmp_path, dead_pid, _jobs_and_busy(1, 1, exemplars[name]), group=publisher.group, name=str(number)
        )
    errors_before = internal_errors.count
    sample = _merged(publisher)[("jobs_total", frozenset({("queue", "q")}))]
    assert internal_errors.count == errors_before
    assert sample.value == 1 + len(files)
    assert sample.exemplar == exemplars[winner]
