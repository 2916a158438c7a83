"""Why the pool closed a DBAPI connection (``poolwatch_disconnects_total``'s ``reason``).

Every pool class closes connections through ``Pool._close_connection`` (the hook in
``pool_hooks``), which is told the connection and nothing else. SQLAlchemy has no event that says
why, so the reason is read from who called it: the SQLAlchemy frames above the hook, up to the
first frame outside SQLAlchemy. Closing is rare (never per checkout), so a short walk up the stack
costs nothing that matters. A call chain SQLAlchemy changes one day gives ``other``, never an
error.

- ``recycled``: replaced at checkout because it was older than ``pool_recycle``.
- ``invalidated``: invalidated (a disconnect error, ``invalidate()``, a failed pre-ping), including
  a connection replaced at checkout because it or the whole pool was invalidated earlier.
- ``reset_failed``: the rollback on return failed, so the connection was invalidated.
- ``overflow``: returned to a pool with no room to keep it (QueuePool's overflow; NullPool every
  time).
- ``disposed``: the pool was disposed (``engine.dispose()``).
- ``other``: anything else (a detached connection closed, a connection whose connect events
  failed, one the garbage collector terminated).
"""

from __future__ import annotations

import os
import time
from types import FrameType

import sqlalchemy

_SQLALCHEMY = os.path.dirname(sqlalchemy.__file__) + os.sep
_MAX_FRAMES = 12


def closing_reason(frame: FrameType | None) -> str:
    """The reason for the close whose caller is ``frame`` (the frame that called the hook)."""
    names: list[str] = []
    recycle_record: object = None
    for _ in range(_MAX_FRAMES):
        if frame is None or not frame.f_code.co_filename.startswith(_SQLALCHEMY):
            break
        name = frame.f_code.co_name
        names.append(name)
        if name == "get_connection":
            recycle_record = frame.f_locals.get("self")
            break
        frame = frame.f_back
    if recycle_record is not None:
        return "recycled" if _past_recycle(recycle_record) else "invalidated"
    if "invalidate" in names:
        return "reset_failed" if "_finalize_fairy" in names else "invalidated"
    if "_do_return_conn" in names:
        return "overflow"
    if "dispose" in names:
        return "disposed"
    return "other"


def _past_recycle(record: object) -> bool:
    """Whether ``get_connection`` is closing ``record``'s connection for its age (the test
    SQLAlchemy itself makes first), rather than for an earlier invalidation."""
    pool = getattr(record, "_ConnectionRecord__pool", None)
    recycle = getattr(pool, "_recycle", -1)
    started = getattr(record, "starttime", None)
    if not isinstance(recycle, (int, float)) or recycle <= -1 or not isinstance(started, (int, float)):
        return False
    return time.time() - started > recycle
