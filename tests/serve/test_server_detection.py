"""Which server this process serves in, read from the main thread's stack, in this process.

``running_server`` looks for the frames of ``gunicorn.arbiter`` (its ``self.num_workers``) and of
``uvicorn.server`` (its ``self.config.workers`` and ``self.config.should_reload``) on the main
thread's stack, and ``warn_if_multiworker`` logs ``poolwatch.multiworker_without_directory`` once
per process when more than one worker serves without the shared directory. tests/test_workers.py
checks that against real gunicorn and uvicorn processes, which mutation testing cannot see into;
these tests run the same code in the pytest process, on real frames: small functions compiled into
namespaces named ``gunicorn.arbiter`` and ``uvicorn.server``, called with real objects as ``self``
(uvicorn's own ``Server`` and ``Config``; an object shaped like gunicorn's ``Arbiter``, whose real
constructor sets up logging and the environment), and a real uvicorn ``Server`` run in this process.

(No test name here says "uvicorn": scripts/mutation.sh deselects such names.)
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import poolwatch
from poolwatch._serve import workers as _workers
from poolwatch._serve.workers import Server, main_thread_frames, running_server

EVENT = "poolwatch.multiworker_without_directory"
HINT = (
    "each worker's /metrics reports only that worker; set POOLWATCH_MULTIPROC_DIR to a directory "
    "private to this service so that any worker reports them all"
)

# The frame a server's method leaves on the stack while the process serves inside it.
SERVING = """
def serve(self, inside):
    return inside()
"""

ARBITER = """
class Arbiter:
    # As gunicorn's: the count behind a property.
    def __init__(self, num_workers):
        self._num_workers = num_workers

    @property
    def num_workers(self):
        return self._num_workers
"""


def _namespace(module: str, source: str = SERVING) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": module}
    exec(compile(source, f"<{module}>", "exec"), namespace)
    return namespace


def _arbiter(num_workers: object) -> object:
    return _namespace("gunicorn.arbiter", ARBITER)["Arbiter"](num_workers)


def _config(workers: int | None = None, *, reload: bool = False) -> uvicorn.Config:
    # An import string, as --reload and --workers require; log_config=None leaves logging alone.
    return uvicorn.Config("main:app", workers=workers, reload=reload, log_config=None)


def _server(config: object) -> object:
    return uvicorn.Server(config)  # type: ignore[arg-type]


def _within(layers: list[tuple[str, object]], inside: Callable[[], Any]) -> Any:
    """Call ``inside`` below one frame per (module, self) layer, outermost first."""
    call = inside
    for module, self in reversed(layers):
        call = functools.partial(_namespace(module)["serve"], self, call)
    return call()


def _stack_here() -> list[FrameType]:
    """The caller's frames, innermost first."""
    frames = []
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def stack(*layers: tuple[str, object]) -> list[FrameType]:
    """Frames captured inside the layers and kept after they returned: no longer the main
    thread's stack, so only ``running_server(frames)`` can find a server in them."""
    frames: list[FrameType] = _within(list(layers), _stack_here)
    return frames


# -- what the frames say ------------------------------------------------------------------------


def test_a_gunicorn_arbiter_frame_gives_its_worker_count() -> None:
    assert running_server(stack(("gunicorn.arbiter", _arbiter(4)))) == Server("gunicorn", 4)


def test_a_server_frame_gives_the_worker_count_of_its_config() -> None:
    frames = stack(("uvicorn.server", _server(_config(3))))
    assert running_server(frames) == Server("uvicorn", 3)


def test_a_single_process_server_is_one_worker() -> None:
    assert running_server(stack(("uvicorn.server", _server(_config())))) == Server("uvicorn", 1)


def test_reloading_serves_in_one_process_whatever_the_workers_flag_says() -> None:
    config = _config(4, reload=True)
    assert config.should_reload is True and config.workers == 4
    assert running_server(stack(("uvicorn.server", _server(config)))) == Server("uvicorn", 1)


def test_reload_asked_for_an_app_object_does_not_reload_so_the_workers_count() -> None:
    # uvicorn reloads only an app given as an import string: should_reload is False here.
    config = uvicorn.Config(lambda *_: None, workers=4, reload=True, log_config=None)
    assert config.should_reload is False
    assert running_server(stack(("uvicorn.server", _server(config)))) == Server("uvicorn", 4)


def test_a_config_without_should_reload_is_not_reloading() -> None:
    class OlderConfig:
        workers = 5

    assert running_server(stack(("uvicorn.server", _server(OlderConfig())))) == Server("uvicorn", 5)


def test_only_should_reload_true_means_reloading() -> None:
    class Truthy:
        workers = 6
        should_reload = "yes"

    assert running_server(stack(("uvicorn.server", _server(Truthy())))) == Server("uvicorn", 6)


def test_gunicorn_outranks_the_one_worker_server_its_worker_class_runs() -> None:
    # gunicorn -k uvicorn.workers.UvicornWorker: a one-worker uvicorn Server inside a worker that
    # the arbiter forked.
    frames = stack(("gunicorn.arbiter", _arbiter(3)), ("uvicorn.server", _server(_config(1))))
    assert running_server(frames) == Server("gunicorn", 3)


def test_the_innermost_server_frame_wins() -> None:
    frames = stack(("uvicorn.server", _server(_config(8))), ("uvicorn.server", _server(_config(2))))
    assert running_server(frames) == Server("uvicorn", 2)


def test_a_server_frame_without_a_usable_count_is_skipped_for_an_outer_one() -> None:
    class NoCount:
        workers = "4"  # a string is not a count

    frames = stack(
        ("uvicorn.server", _server(_config(2))),
        ("uvicorn.server", object()),  # a frame whose self has no config
        ("uvicorn.server", _server(NoCount())),
    )
    assert running_server(frames) == Server("uvicorn", 2)


def test_a_gunicorn_frame_without_an_int_count_is_ignored() -> None:
    for self in (_arbiter("4"), _arbiter(None), _arbiter(4.0), object()):
        frames = stack(("uvicorn.server", _server(_config(2))), ("gunicorn.arbiter", self))
        assert running_server(frames) == Server("uvicorn", 2), self


def test_a_gunicorn_count_is_not_read_from_a_server_frame() -> None:
    class Both:
        num_workers = 7
        config = _config(2)

    assert running_server(stack(("uvicorn.server", Both()))) == Server("uvicorn", 2)
    assert running_server(stack(("gunicorn.arbiter", Both()))) == Server("gunicorn", 7)


def test_frames_of_other_modules_are_ignored() -> None:
    class Lookalike:
        num_workers = 4
        config = _config(4)

    for module in (
        "gunicorn",
        "uvicorn",
        "gunicorn.app.base",
        "uvicorn.main",
        "myapp.server",
        "GUNICORN.ARBITER",
    ):
        assert running_server(stack((module, Lookalike()))) is None, module


def test_a_frame_without_a_module_name_is_ignored() -> None:
    class Lookalike:
        num_workers = 4
        config = _config(4)

    nameless: dict[str, Any] = {}  # code exec'd in bare globals has no __name__
    exec(compile(SERVING, "<nameless>", "exec"), nameless)
    assert "__name__" not in nameless
    assert running_server(nameless["serve"](Lookalike(), _stack_here)) is None


def test_no_server_frame_is_no_server() -> None:
    assert running_server(stack()) is None
    assert running_server([]) is None


def test_without_frames_it_reads_the_main_threads_own_stack() -> None:
    assert threading.current_thread() is threading.main_thread()
    assert running_server() is None  # pytest serves nothing
    found = _within([("uvicorn.server", _server(_config(3)))], running_server)
    assert found == Server("uvicorn", 3)
    found = _within([("gunicorn.arbiter", _arbiter(2))], running_server)
    assert found == Server("gunicorn", 2)


def test_frames_given_are_read_instead_of_the_main_threads_stack() -> None:
    frames = stack(("uvicorn.server", _server(_config(3))))
    # Inside a gunicorn frame on the main thread, the frames given still decide.
    assert _within([("gunicorn.arbiter", _arbiter(5))], lambda: running_server(frames)) == Server(
        "uvicorn", 3
    )


# -- the main thread's frames, from another thread ----------------------------------------------


def test_the_main_threads_frames_are_read_from_another_thread_innermost_first() -> None:
    seen: list[FrameType] = []

    def look() -> None:
        seen.extend(main_thread_frames())

    def main_waits_here() -> None:
        reader = threading.Thread(target=look)
        reader.start()
        reader.join()

    main_waits_here()
    names = [frame.f_code.co_name for frame in seen]
    assert "look" not in names  # the reader's own stack is not read
    here = names.index("main_waits_here")
    assert names[here + 1] == sys._getframe().f_code.co_name  # this test, one frame out
    # Innermost first: each frame's caller comes next, to the outermost frame.
    assert all(inner.f_back is outer for inner, outer in itertools.pairwise(seen))
    assert seen[-1].f_back is None
    # The innermost one is where the main thread waits: inside Thread.join, below main_waits_here.
    assert seen[0].f_code.co_filename == threading.__file__ and here > 0


def test_the_main_threads_server_is_found_from_another_thread() -> None:
    found: list[Server | None] = []

    def look() -> None:
        found.append(running_server())

    def serve_and_look() -> None:
        reader = threading.Thread(target=look)
        reader.start()
        reader.join()

    _within([("uvicorn.server", _server(_config(4)))], serve_and_look)
    assert found == [Server("uvicorn", 4)]


# -- the warning, once per process --------------------------------------------------------------


@pytest.fixture
def undecided(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As in a fresh process: nothing decided yet."""
    monkeypatch.setattr(_workers, "_decided_in", None)
    yield


def _watch_within(layers: list[tuple[str, object]], **settings: Any) -> list[dict[str, Any]]:
    """The events logged while a PoolWatch starts below ``layers`` on the main thread."""
    with capture_logs() as events:
        watch = _within(layers, lambda: poolwatch.watch(registry=CollectorRegistry(), **settings))
    watch.close()
    return [dict(event) for event in events if event["event"] == EVENT]


@pytest.mark.usefixtures("undecided")
def test_several_workers_without_the_directory_are_warned_about_once_per_process() -> None:
    layers: list[tuple[str, object]] = [("uvicorn.server", _server(_config(3)))]
    assert _watch_within(layers) == [
        {
            "event": EVENT,
            "log_level": "warning",
            "server": "uvicorn",
            "workers": 3,
            "pid": os.getpid(),
            "setting": "POOLWATCH_MULTIPROC_DIR",
            "hint": HINT,
        }
    ]
    # A second PoolWatch in the same process (another app, a test) says nothing more.
    assert _watch_within(layers) == []
    assert _watch_within([("gunicorn.arbiter", _arbiter(9))]) == []


@pytest.mark.usefixtures("undecided")
def test_a_gunicorn_master_with_workers_is_named_in_the_warning() -> None:
    [event] = _watch_within([("gunicorn.arbiter", _arbiter(2))])
    assert (event["server"], event["workers"], event["pid"]) == ("gunicorn", 2, os.getpid())


@pytest.mark.usefixtures("undecided")
def test_a_process_that_decided_before_a_fork_decides_afresh_in_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a forked worker sees: the decision recorded under another pid (its parent's).
    monkeypatch.setattr(_workers, "_decided_in", os.getpid() + 1)
    [event] = _watch_within([("uvicorn.server", _server(_config(2)))])
    assert (event["server"], event["workers"]) == ("uvicorn", 2)


@pytest.mark.usefixtures("undecided")
def test_one_worker_is_not_warned_about_and_the_process_has_decided() -> None:
    assert _watch_within([("uvicorn.server", _server(_config(1)))]) == []
    assert _watch_within([("uvicorn.server", _server(_config(4, reload=True)))]) == []
    assert _watch_within([("gunicorn.arbiter", _arbiter(1))]) == []
    # The check ran once, at the first PoolWatch: a later one under more workers is not looked at.
    assert _watch_within([("uvicorn.server", _server(_config(4)))]) == []


@pytest.mark.usefixtures("undecided")
def test_no_server_is_not_warned_about() -> None:
    assert _watch_within([]) == []


@pytest.mark.usefixtures("undecided")
def test_several_workers_with_the_directory_are_not_warned_about(tmp_path: Path) -> None:
    (tmp_path / "mp").mkdir()
    layers: list[tuple[str, object]] = [("uvicorn.server", _server(_config(4)))]
    assert _watch_within(layers, multiproc_dir=str(tmp_path / "mp")) == []
    # With the directory the process has not decided anything: a PoolWatch without it still warns.
    [event] = _watch_within(layers)
    assert event["workers"] == 4


# -- a real server, run in this process ----------------------------------------------------------


@pytest.mark.usefixtures("undecided")
def test_an_app_served_by_a_real_server_in_this_process_finds_it_and_warns() -> None:
    # A worker of `--workers 3` receives the whole Config and serves inside Server.run, as here.
    found: list[Server | None] = []
    watches: list[poolwatch.PoolWatch] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while (await receive())["type"] == "lifespan.startup":
            found.append(running_server())
            watches.append(poolwatch.watch(registry=CollectorRegistry()))
            server.should_exit = True  # serve nothing: stop once started
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    config = uvicorn.Config(app, host="127.0.0.1", port=0, workers=3, lifespan="on", log_config=None)
    server = uvicorn.Server(config)
    with capture_logs() as events:
        server.run()
    for watch in watches:
        watch.close()
    assert found == [Server("uvicorn", 3)]
    warned = [event for event in events if event["event"] == EVENT]
    assert [(event["server"], event["workers"], event["pid"]) for event in warned] == [
        ("uvicorn", 3, os.getpid())
    ]
