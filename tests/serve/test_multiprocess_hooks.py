"""The two process-wide hooks of multi-worker mode, run in process: at exit every publisher closes
(its file stays, marked dead, so the worker's counts still count); in a forked child every publisher
starts writing again, and one that fails to is counted without stopping the others.

tests/test_multiworker.py plays both in real worker processes; these call the hooks the
interpreter would call (``atexit`` and ``os.register_at_fork`` hold them), on publishers of the
test's own.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest

from poolwatch._log import internal_errors
from poolwatch._serve import multiprocess
from poolwatch._serve.multiprocess import Publisher
from tests.serve.test_multiprocess_files import KEY, Counts, _document, _published, _started, _wait_for


@pytest.fixture
def publishers(monkeypatch: pytest.MonkeyPatch) -> weakref.WeakSet[Publisher]:
    """The hooks' set of publishers, holding only the test's own."""
    own: weakref.WeakSet[Publisher] = weakref.WeakSet()
    monkeypatch.setattr(multiprocess, "_publishers", own)
    return own


def test_at_exit_every_publisher_closes_and_marks_its_file_dead(
    tmp_path: Path, publishers: weakref.WeakSet[Publisher]
) -> None:
    local = Counts(jobs=1)
    first = _started(Publisher(local, tmp_path / "a", KEY, 3600))
    second = _started(Publisher(local, tmp_path / "b", KEY, 3600))
    assert set(publishers) == {first, second}
    local.jobs = 2
    multiprocess._close_all()
    for publisher in (first, second):
        assert _document(publisher.path)["dead"] is True
        assert _published(publisher.path, "jobs_total") == 2
    assert set(publishers) == set()


class _Unforkable:
    def after_fork_in_child(self) -> None:
        raise RuntimeError("cannot restart")


def test_after_a_fork_every_publisher_writes_again_and_a_failure_is_counted(
    tmp_path: Path, publishers: weakref.WeakSet[Publisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = _started(Publisher(Counts(jobs=5), tmp_path, KEY, 3600))
    thread = publisher._thread
    assert thread is not None
    publisher._stop.set()  # the writer thread a fork leaves behind: gone in the child
    thread.join(5)
    publisher.path.unlink()
    broken = _Unforkable()
    publishers.add(broken)  # type: ignore[arg-type]
    recorded: list[tuple[str, str]] = []
    record = internal_errors.record

    def counted(site: str, error: BaseException) -> None:
        recorded.append((site, str(error)))
        record(site, error)

    monkeypatch.setattr(internal_errors, "record", counted)
    try:
        multiprocess._restart_all_after_fork()
        assert recorded == [("multiprocess_fork", "cannot restart")]
        _wait_for(publisher.path.exists)
        assert _published(publisher.path, "jobs_total") == 5
    finally:
        publisher.close()
