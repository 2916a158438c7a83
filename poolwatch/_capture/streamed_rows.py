"""Row fetches on a server-side cursor, timed as waiting on the database.

A statement on a server-side cursor (``stream_results=True``, ``yield_per``, ``AsyncConnection.stream``,
``AsyncSession.stream``) returns from the driver's ``execute`` at once: the server runs the query as
the rows are fetched (psycopg sends ``FETCH FORWARD n``, asyncpg pulls the portal), so the time of
such a query goes into its fetches, after the dialect's ``do_execute`` that the statement timer
wraps. Without them a streaming export that waited seconds on the database looks held idle.

The seam is the fetch strategy SQLAlchemy puts on such a result. For a server-side cursor whose
execution context still has SQLAlchemy's default strategy, SQLAlchemy makes a
``BufferedRowCursorFetchStrategy`` when it sets up the result; the statement timer hands the context
``TimedBufferedRows`` instead, a subclass that does exactly what SQLAlchemy's would (same buffer
sizes, same calls on the DBAPI cursor, in the same order) and adds the time of each call that
reaches the cursor to its checkout's usage. Nothing is stored on the engine, pool, dialect or
cursor; one object per streamed result, none for any other statement.

Why not elsewhere: a ConnectionEvents listener is never installed (see ``dialect_hooks``); the
drivers' cursors have ``__slots__`` (nothing to wrap per instance), and a proxy in place of the
DBAPI cursor would change the object SQLAlchemy and dialects work with.

SQLAlchemy's own strategy fetches the first row when it is made (psycopg2 needs that for
``cursor.description``), which happens after the dialect's ``post_exec``; a dialect may still
replace the strategy there. So the first fetch here waits until SQLAlchemy reads
``alternate_cursor_description``, which it does right where it would have made its own strategy
(or, should that change, until the first fetch): an object made here and then replaced by the
dialect has fetched nothing.
"""

from __future__ import annotations

import collections
from typing import Any

from sqlalchemy.engine import cursor as sa_cursor

from .._record.recorder import perf_counter

# The strategy of a context no dialect has changed: SQLAlchemy tests it by identity too.
DEFAULT_FETCH = sa_cursor._DEFAULT_FETCH


def time_fetches(context: Any, usage: list[float]) -> None:
    """Give a server-side statement's execution context the timed strategy, if SQLAlchemy would
    give it the buffered one. An INSERT is left alone: SQLAlchemy reads its strategy earlier
    (``insertmanyvalues``), and its rows come back with the statement."""
    if context.cursor_fetch_strategy is DEFAULT_FETCH and not context.isinsert:
        context.cursor_fetch_strategy = TimedBufferedRows(context.cursor, context.execution_options, usage)


class TimedBufferedRows(sa_cursor.BufferedRowCursorFetchStrategy):
    """SQLAlchemy's buffered strategy for server-side cursors; each call that fetches from the
    DBAPI cursor adds its time to ``usage[1]`` (a checkout's seconds waiting on the database),
    whether it returns rows, raises or is cancelled."""

    __slots__ = ("_first_due", "_pending_cursor", "_usage")

    def __init__(self, dbapi_cursor: Any, execution_options: Any, usage: list[float]) -> None:
        # SQLAlchemy's constructor without its first fetch, which is due later (see the module).
        super().__init__(dbapi_cursor, execution_options, initial_buffer=collections.deque())
        self._usage = usage
        self._first_due = True
        self._pending_cursor: Any = dbapi_cursor

    @property
    def alternate_cursor_description(self) -> Any:  # type: ignore[override]
        # Read by SQLAlchemy where it would make its own strategy: the moment of its first fetch.
        if self._first_due:
            self._fetch_first()
        return None

    def _fetch_first(self) -> None:
        dbapi_cursor = self._pending_cursor
        self._first_due = False
        self._pending_cursor = None
        started = perf_counter()
        try:
            self._rowbuffer = collections.deque(dbapi_cursor.fetchmany(1))
        finally:
            self._usage[1] += perf_counter() - started

    def _first_fetch_now(self, result: Any, dbapi_cursor: Any) -> None:
        """The first fetch, if SQLAlchemy fetches before reading the description (it does not
        today), with its errors handled as any fetch's."""
        try:
            self._fetch_first()
        except BaseException as error:
            self.handle_exception(result, dbapi_cursor, error)

    def _buffer_rows(self, result: Any, dbapi_cursor: Any) -> None:
        # The only call of fetchone() that reaches the cursor: most rows come from the buffer, and
        # are not timed, so a stream that works between rows shows that work as idle.
        if self._first_due:
            self._first_fetch_now(result, dbapi_cursor)
            if self._rowbuffer:
                return
        started = perf_counter()
        try:
            super()._buffer_rows(result, dbapi_cursor)
        finally:
            self._usage[1] += perf_counter() - started

    def fetchmany(self, result: Any, dbapi_cursor: Any, size: int | None = None) -> Any:
        if self._first_due:
            self._first_fetch_now(result, dbapi_cursor)
        started = perf_counter()
        try:
            return super().fetchmany(result, dbapi_cursor, size)
        finally:
            self._usage[1] += perf_counter() - started

    def fetchall(self, result: Any, dbapi_cursor: Any) -> Any:
        if self._first_due:
            self._first_fetch_now(result, dbapi_cursor)
        started = perf_counter()
        try:
            return super().fetchall(result, dbapi_cursor)
        finally:
            self._usage[1] += perf_counter() - started

    def soft_close(self, result: Any, dbapi_cursor: Any) -> None:
        self._first_due = False  # closed before any fetch: nothing is due
        self._pending_cursor = None
        super().soft_close(result, dbapi_cursor)

    def hard_close(self, result: Any, dbapi_cursor: Any) -> None:
        self._first_due = False
        self._pending_cursor = None
        super().hard_close(result, dbapi_cursor)
