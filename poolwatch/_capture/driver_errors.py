"""The driver's own class name for an error, under the wrappers SQLAlchemy and adapters put on it."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

# Exception class names that say only "the driver failed"; the cause underneath says how.
_GENERIC = frozenset({"Error", "DatabaseError", "InterfaceError", "OperationalError", "DBAPIError"})


def driver_error_class(exception: BaseException) -> str:
    """The most specific class name available for ``exception``.

    SQLAlchemy wraps the driver's exception (``DBAPIError.orig``), and async adapters wrap it again
    in generic classes such as asyncpg's adapted ``Error``; the driver's own class underneath
    (``ConnectionDoesNotExistError``, ``InvalidCatalogNameError``) is what an operator can act on.
    A driver whose own class is generic (psycopg's ``OperationalError`` for a failed connect: libpq
    gives no SQLSTATE there) keeps it.
    """
    current: BaseException = exception
    for _ in range(4):  # a short chain: a cycle or a deep one is not worth following
        if isinstance(current, sa_exc.DBAPIError) and current.orig is not None:
            inner: BaseException | None = current.orig
        elif type(current).__name__ in _GENERIC:
            inner = current.__cause__ or current.__context__
        else:
            break
        if inner is None:
            break
        current = inner
    return type(current).__name__
