"""Where the application took a connection: the first frame outside the libraries in between.

This runs on every checkout, so the walk is kept cheap: each code object is classified once and
cached, and only the chosen frame's line number is computed. For async engines the checkout runs in
SQLAlchemy's greenlet, whose frames end at the greenlet; the walk continues in the parent greenlet,
which is suspended inside the application's ``await``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from types import CodeType, FrameType

try:
    import greenlet as _greenlet  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - greenlet comes with sqlalchemy[asyncio]
    _greenlet = None


def _package_dir(module_name: str) -> str | None:
    """The directory of a top-level package, found without importing it (``import fastapi`` alone
    costs ~0.4 s, and an application without FastAPI should not pay for it)."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None) if module is not None else None
    if file is None:
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        locations = list(spec.submodule_search_locations or ())
        file = spec.origin if not locations else os.path.join(locations[0], "__init__.py")
    return os.path.dirname(os.path.abspath(file)) + os.sep if file else None


_SKIPPED_PACKAGES = ("poolwatch", "sqlalchemy", "starlette", "fastapi", "anyio", "asyncio",
                     "concurrent", "greenlet", "uvicorn", "asyncpg", "psycopg", "psycopg_pool")  # fmt: skip
_SKIPPED_MODULES = ("contextlib", "threading", "contextvars", "functools")
_skipped_prefixes: tuple[str, ...] = tuple(
    p for p in (_package_dir(name) for name in _SKIPPED_PACKAGES) if p is not None
)
_skipped_files: frozenset[str] = frozenset(
    os.path.abspath(f)
    for f in (getattr(sys.modules.get(m) or __import__(m), "__file__", None) for m in _SKIPPED_MODULES)
    if f
)

# Keyed by file name, which is all the classification reads: a str caches its hash, while CPython
# 3.11 hashes a code object anew on every lookup (about a third of the borrow site's cost).
is_library_file: dict[str, bool] = {}
_MAX_FRAMES = 200


def _classify(filename: str) -> bool:
    library = (
        filename.startswith("<")  # generated code: dataclasses, attrs, eval
        or filename.startswith(_skipped_prefixes)
        or filename in _skipped_files
    )
    is_library_file[filename] = library
    return library


def application_frame(start: FrameType | None) -> FrameType | None:
    """The innermost frame at or above ``start`` that belongs to the application."""
    frame = start
    is_library = is_library_file
    hops = 0
    crossed_greenlet = False
    while hops < _MAX_FRAMES:
        if frame is None:
            if crossed_greenlet:
                return None
            frame = _parent_greenlet_frame()
            crossed_greenlet = True
            if frame is None:
                return None
        filename = frame.f_code.co_filename
        library = is_library.get(filename)
        if library is None:
            library = _classify(filename)
        if not library:
            return frame
        frame = frame.f_back
        hops += 1
    return None


def _parent_greenlet_frame() -> FrameType | None:
    if _greenlet is None:
        return None
    current = _greenlet.getcurrent()
    parent = current.parent
    if parent is None:
        return None
    frame: FrameType | None = parent.gr_frame
    return frame


def borrow_site(depth: int) -> tuple[CodeType, int] | None:
    """(code, instruction offset) of the application frame that took the connection.

    ``depth`` counts frames up from this function, as ``sys._getframe`` does. The first frame is
    tested here before handing over to the full walk: code that calls the pool directly is common.
    """
    try:
        frame = sys._getframe(depth)
    except ValueError:  # a shallow stack (the root of a greenlet or thread): nothing to name
        return None
    filename = frame.f_code.co_filename
    library = is_library_file.get(filename)
    if library is None:
        library = _classify(filename)
    if library:
        found = application_frame(frame.f_back)
        if found is None:
            return None
        frame = found
    return frame.f_code, frame.f_lasti


def borrow_stack(depth: int) -> traceback.StackSummary:
    """The whole stack, across the greenlet boundary, without reading source lines now."""
    frames: list[tuple[FrameType, int]] = []
    try:
        frame: FrameType | None = sys._getframe(depth)
    except ValueError:  # a shallow stack: start from the outermost frame there is
        frame = sys._getframe(1)
    parent_hops = 0
    while frame is not None and len(frames) < _MAX_FRAMES:
        frames.append((frame, frame.f_lineno))
        frame = frame.f_back
        if frame is None and parent_hops == 0:
            frame = _parent_greenlet_frame()
            parent_hops += 1
    frames.reverse()
    return traceback.StackSummary.extract(iter(frames), lookup_lines=False)
