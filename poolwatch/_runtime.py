"""What poolwatch needs of the interpreter it runs in.

The hot path counts without a lock (see ``_record.recorder``): an ``int += 1`` or a dict
``setdefault``/``pop`` is whole because CPython with its global interpreter lock switches threads
only at calls and backward jumps. A free-threaded build (3.13t, 3.14t) running without the GIL has
no such guarantee: the counts would drift silently under threads. Rather than report numbers that
may be wrong, poolwatch refuses to start there, and says how to run it.
"""

from __future__ import annotations

import sys


def gil_enabled() -> bool:
    """False only on a free-threaded build that runs without the GIL right now."""
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_enabled is None else bool(is_enabled())


def require_gil() -> None:
    """Raise ``RuntimeError`` with what to do if this interpreter runs without the GIL."""
    if gil_enabled():
        return
    raise RuntimeError(
        "poolwatch: this Python runs without the global interpreter lock (a free-threaded build, "
        f"{sys.version.split()[0]}); poolwatch's lock-free counts rely on it and would drift under "
        "threads. Run with the GIL enabled (PYTHON_GIL=1 or python -X gil=1), or on a standard build."
    )
