"""The suite's own PostgreSQL database, so it never disturbs other tests on the same server.

SQLAlchemy's README.unittests.rst asks for an empty UTF8 database with the schemas
``test_schema`` and ``test_schema_2``, English full-text search, and (PostgreSQL < 13) the hstore
and citext extensions; two-phase tests need ``max_prepared_transactions`` > 0, a server setting
we leave alone (those tests skip themselves, the same in both runs).
"""

from __future__ import annotations

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

SCHEMAS = ("test_schema", "test_schema_2")
EXTENSIONS = ("hstore", "citext")


def _conninfo(url: str) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def prepare(url: str) -> list[str]:
    """Create the database named in ``url`` if absent, with what the suite expects; say what was done.

    ``url`` is a SQLAlchemy URL; the server's ``postgres`` database is used to create it.
    """
    done: list[str] = []
    target = make_url(url)
    database = target.database
    if not database:
        raise ValueError(f"sqla_suite: the database URL names no database: {target!r}")
    admin = _conninfo(target.set(database="postgres").render_as_string(hide_password=False))
    with psycopg.connect(admin, autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if exists is None:
            connection.execute(
                sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(
                    sql.Identifier(database)
                )
            )
            done.append(f"created database {database}")
        connection.execute(
            sql.SQL("ALTER DATABASE {} SET default_text_search_config = 'pg_catalog.english'").format(
                sql.Identifier(database)
            )
        )
    with psycopg.connect(_conninfo(url), autocommit=True) as connection:
        for schema in SCHEMAS:
            present = connection.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)
            ).fetchone()
            if present is None:
                connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
                done.append(f"created schema {schema}")
        for extension in EXTENSIONS:
            connection.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(extension)))
    return done


def leftover_tables(url: str) -> list[str]:
    """Tables left in the public and test schemas (the suite wants to start from an empty one)."""
    with psycopg.connect(_conninfo(url), autocommit=True) as connection:
        rows = connection.execute(
            "SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname = ANY(%s) ORDER BY 1",
            (["public", *SCHEMAS],),
        ).fetchall()
    return [row[0] for row in rows]
