"""Turning what the user passed into (pool name, pool) pairs, with clear errors.

A pool is a SQLAlchemy sync Engine (an AsyncEngine's ``sync_engine``), or one of the pool libraries'
own pools: asyncpg's ``Pool`` (``_capture.asyncpg_pool``), psycopg_pool's ``ConnectionPool`` and
``AsyncConnectionPool`` (``_capture.psycopg_pool``). A driver is never imported here: an
application that made such a pool has imported its library already.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

from sqlalchemy.engine import Engine

if TYPE_CHECKING:
    # Not imported at run time: ``sqlalchemy.ext.asyncio`` costs ~0.1 s to import, and an
    # application that made an AsyncEngine has imported it already (see sync_engine_of).
    from psycopg_pool import AsyncConnectionPool, ConnectionPool
    from sqlalchemy.ext.asyncio import AsyncEngine

# asyncpg's Pool is accepted too; asyncpg ships no types, so it needs no place here.
EngineLike: TypeAlias = "Engine | AsyncEngine | ConnectionPool[Any] | AsyncConnectionPool[Any]"
# What one argument may name: an engine, several of them, or {pool name: engine}. The containers
# are the ones collect_engines() accepts; a wider Collection would make a type checker unable to
# infer a {name: engine} literal that mixes Engine and AsyncEngine.
Engines: TypeAlias = (
    "EngineLike | Mapping[str, EngineLike] | list[EngineLike] | tuple[EngineLike, ...]"
    " | set[EngineLike] | frozenset[EngineLike]"
)


def sync_engine_of(candidate: object, where: str) -> Engine:
    """The sync Engine behind an Engine or AsyncEngine; anything else is a clear TypeError."""
    found = pool_of(candidate, where)
    if not isinstance(found, Engine):
        raise TypeError(f"poolwatch: {where} must be a SQLAlchemy Engine or AsyncEngine")
    return found


def driver_pool_kind(candidate: object) -> str | None:
    """ "asyncpg" for asyncpg's own Pool, "psycopg_pool" for psycopg_pool's ConnectionPool and
    AsyncConnectionPool (and their subclasses); None for anything else."""
    asyncpg_pool = sys.modules.get("asyncpg.pool")
    if asyncpg_pool is not None and isinstance(candidate, asyncpg_pool.Pool):
        return "asyncpg"
    psycopg_pool = sys.modules.get("psycopg_pool")
    if psycopg_pool is not None and isinstance(
        candidate, (psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool)
    ):
        return "psycopg_pool"
    return None


def driver_library(pool: object) -> ModuleType:
    """The ``_capture`` room of a driver pool's library (``check_supported``, ``source_for``,
    ``hook_pool``, ``unhook_pool``, ``default_name``)."""
    kind = driver_pool_kind(pool)
    if kind == "asyncpg":
        from . import asyncpg_pool

        return asyncpg_pool
    if kind == "psycopg_pool":
        from . import psycopg_pool

        return psycopg_pool
    raise TypeError(f"poolwatch: not a pool library's pool: {type(pool).__qualname__}")


def pool_of(candidate: object, where: str) -> Any:
    """The sync Engine behind an Engine or AsyncEngine, or a pool library's own pool as given;
    anything else is a clear TypeError."""
    if isinstance(candidate, Engine):
        return candidate
    asyncio_extension = sys.modules.get("sqlalchemy.ext.asyncio")
    if asyncio_extension is not None and isinstance(candidate, asyncio_extension.AsyncEngine):
        sync_engine: Engine = candidate.sync_engine
        return sync_engine
    if driver_pool_kind(candidate) is not None:
        return candidate
    raise TypeError(
        f"poolwatch: {where} must be a SQLAlchemy Engine or AsyncEngine, an asyncpg Pool, or a "
        "psycopg_pool ConnectionPool or AsyncConnectionPool, "
        f"got {type(candidate).__module__}.{type(candidate).__qualname__}"
    )


def pool_key(target: Any) -> int:
    """What makes two targets the same pool: an engine's pool (shared by its copies and
    execution_options() engines), or the driver's pool itself."""
    return id(target.pool) if isinstance(target, Engine) else id(target)


def root_engine(engine: Engine) -> Engine:
    """The engine an ``execution_options()`` engine derives from (it shares that one's pool)."""
    for _ in range(32):  # OptionEngine chains are short; never loop on a strange object
        proxied = getattr(engine, "_proxied", None)
        if not isinstance(proxied, Engine):
            break
        engine = proxied
    return engine


def collect_engines(
    engines: Iterable[Any],
    name: str | None = None,
    known_name: Callable[[Any], str | None] = lambda engine: None,
) -> list[tuple[str, Any]]:
    """Flatten engines, lists of engines and {name: engine} mappings into named sync engines.

    An engine that is already watched keeps the name it has (``known_name``): one engine is one
    pool with one name, however often it is instrumented.
    """
    named: list[tuple[str | None, Any]] = []
    for position, item in enumerate(engines):
        if isinstance(item, Mapping):
            for key, value in item.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(f"poolwatch: pool names must be non-empty strings, got {key!r}")
                named.append((key, pool_of(value, f"engine {key!r}")))
        elif isinstance(item, (list, tuple, set, frozenset)):
            for inner, value in enumerate(item):
                named.append((None, pool_of(value, f"engines[{position}][{inner}]")))
        else:
            named.append((None, pool_of(item, f"engine #{position + 1}")))
    if not named:
        raise TypeError("poolwatch: no engine given; pass an Engine, an AsyncEngine or {name: engine}")
    if name is not None:
        if len(named) != 1:
            raise TypeError("poolwatch: name= names a single engine; pass {name: engine} for several")
        named = [(name, named[0][1])]

    result: list[tuple[str, Any]] = []
    # Keyed by the pool: an engine, its execution_options() engines and its copies share one pool,
    # which is counted once, under one name.
    seen_pools: dict[int, str] = {}
    seen_names: dict[str, Any] = {}
    for given, engine in named:
        first_name = seen_pools.get(pool_key(engine))
        if first_name is not None:
            if given is not None and given != first_name:
                raise ValueError(
                    f"poolwatch: {first_name!r} and {given!r} name the same pool (an engine and its "
                    "execution_options() or copies share one pool, counted once under one name); "
                    f"pass that pool once, e.g. {{{first_name!r}: engine}}"
                )
            continue  # the same pool again, unnamed or under the same name: counted once
        # A name given now wins; else the pool keeps the name it is already watched under.
        pool_name = given or known_name(engine) or default_pool_name(engine)
        if pool_name in seen_names:
            raise ValueError(
                f"poolwatch: two engines would both be pool {pool_name!r}; "
                "name them with a mapping such as {'primary': engine, 'replica': other}"
            )
        seen_pools[pool_key(engine)] = pool_name
        seen_names[pool_name] = engine
        result.append((pool_name, engine))
    return result


def default_pool_name(engine: Any) -> str:
    """The pool's logging_name, else host:port/database; never a user name or a password."""
    if driver_pool_kind(engine) is not None:
        name: str = driver_library(engine).default_name(engine)
        return name
    logging_name = getattr(engine.pool, "logging_name", None)
    if logging_name:
        return str(logging_name)
    url = engine.url
    database = url.database or ""
    if url.host:
        host = f"{url.host}:{url.port}" if url.port else url.host
        return f"{host}/{database}"
    return database or f"{url.get_backend_name()}:memory"
