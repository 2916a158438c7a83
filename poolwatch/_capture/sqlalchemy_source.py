"""SQLAlchemy's engines as a ``PoolSource``: state from the pool's own counts, and the probe steps.

The probe's steps are moved here unchanged from ``_serve.probe``: only ``pool.connect()`` is used (the
probe never opens a connection the pool does not own), the dialect's ``do_ping`` is called through
the class (not the instance, whose ``do_ping`` is poolwatch's pre-ping counter), and async engines
run each step in SQLAlchemy's greenlet.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.pool import AssertionPool, SingletonThreadPool, StaticPool
from sqlalchemy.util import greenlet_spawn

from .._log import internal_errors
from .._record.server import role_tag, server_label
from .._record.source import PoolState

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

# Pools a probe cannot use without disturbing the application (see ``_serve.probe``).
_NEVER_PROBED = (SingletonThreadPool, StaticPool, AssertionPool)


class SqlAlchemySource:
    library = "sqlalchemy"
    unavailable: frozenset[str] = frozenset()

    def __init__(self, engine: Engine) -> None:
        self._engine_ref = weakref.ref(engine)
        # A minimal third-party dialect may lack either; SQLAlchemy itself does not need them.
        self.dialect = str(getattr(engine.dialect, "name", None) or "unknown")
        self.driver = str(getattr(engine.dialect, "driver", None) or "unknown")
        self.server = server_label(engine.url)
        self.role = role_tag(engine.url)
        self.is_async = bool(getattr(engine.dialect, "is_async", False))

    @property
    def engine(self) -> Engine | None:
        return self._engine_ref()

    @property
    def pool(self) -> Pool | None:
        engine = self._engine_ref()
        return None if engine is None else engine.pool

    @property
    def pool_class(self) -> str:
        pool = self.pool
        return type(pool).__name__ if pool is not None else "unknown"

    def read_state(self, live_count: int) -> PoolState:
        """What the pool holds now. QueuePool-like pools count for themselves; others do not."""
        pool: Any = self.pool
        checkedout = getattr(pool, "checkedout", None)
        if pool is None or not callable(checkedout):
            # NullPool, StaticPool, SingletonThreadPool: our own table of checkouts is the truth.
            return PoolState(used=live_count, idle=0, overflow=0, max=None, taken=live_count)
        size = pool.size()
        max_overflow = getattr(pool, "_max_overflow", -1)
        bounded = size > 0 and max_overflow > -1
        taken = max(0, checkedout())
        return PoolState(
            used=live_count,
            idle=max(0, pool.checkedin()),
            overflow=max(0, pool.overflow()),
            max=size + max_overflow if bounded else None,
            taken=max(taken, live_count),
        )

    def ensure_limit_read(self, recorder: Any, loop: Any = None) -> None:
        """Start a background read of the server's connection limit if one is due (never waits)."""
        from .capacity import ensure_read

        ensure_read(recorder, loop)

    def never_probed(self) -> bool:
        return isinstance(self.pool, _NEVER_PROBED)

    # -- probe steps ----------------------------------------------------------------------------

    def _live_engine(self) -> Engine:
        engine = self._engine_ref()
        if engine is None:
            raise ReferenceError("engine collected")
        return engine

    async def checkout_async(self) -> Any:
        return await greenlet_spawn(_checkout, self._live_engine().pool)

    async def ping_async(self, connection: Any) -> bool:
        return bool(await greenlet_spawn(_ping, self._live_engine(), connection.dbapi_connection))

    async def release_async(self, connection: Any) -> None:
        await greenlet_spawn(connection.close)

    def checkout_sync(self) -> Any:
        return self._live_engine().pool.connect()

    def ping_sync(self, connection: Any) -> bool:
        return _ping(self._live_engine(), connection.dbapi_connection)

    def release_sync(self, connection: Any) -> None:
        connection.close()

    def discard(self, connection: Any) -> None:
        """Throw away a connection the probe may have left mid-conversation, without waiting."""
        try:
            connection.invalidate()
        except Exception as error:
            internal_errors.record("probe_invalidate", error)
        try:
            connection.close()
        except Exception as error:
            internal_errors.record("probe_checkin", error)


def _checkout(pool: Pool) -> Any:
    # A frame of our own between the greenlet's root and pool.connect: the checkout hook looks
    # two frames up for the borrow site, and a greenlet's stack ends right here.
    return pool.connect()


def _ping(engine: Engine, dbapi_connection: Any) -> bool:
    dialect = engine.dialect
    # Through the class: the instance's do_ping is poolwatch's pre-ping counter.
    return bool(type(dialect).do_ping(dialect, dbapi_connection))
