"""One pool, one name: an engine and its execution_options() engines or copies share one pool.

Naming that pool twice in one call is a ValueError naming both names (README, "Installing it in your
service"); giving it once, or again without a name, counts it once under the first name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from tests.metrics import scrape


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=2)
    yield engine
    engine.dispose()


@pytest.mark.parametrize(
    "derive",
    [
        lambda engine: engine.execution_options(isolation_level="AUTOCOMMIT"),
        lambda engine: copy.copy(engine),
    ],
    ids=["execution_options", "copy"],
)
def test_two_names_for_one_pool_are_refused_naming_both(
    engine: sa.Engine, registry: CollectorRegistry, derive: object
) -> None:
    derived = derive(engine)  # type: ignore[operator]
    assert derived.pool is engine.pool
    with pytest.raises(ValueError) as refused:
        poolwatch.watch({"rw": engine, "ac": derived}, registry=registry)
    message = str(refused.value)
    assert "'rw' and 'ac' name the same pool" in message, message
    assert "execution_options()" in message
    # Nothing was left registered or hooked by the refused call.
    assert list(registry.collect()) == []
    watch = poolwatch.watch({"rw": engine}, registry=registry)
    assert watch.pool_names == ["rw"]
    watch.close()


def test_a_name_given_after_an_unnamed_use_of_the_pool_is_refused_too(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with pytest.raises(ValueError, match="'ac' name the same pool"):
        poolwatch.watch(engine, {"ac": autocommit}, registry=registry)


def test_the_same_pool_again_without_a_name_or_under_its_name_is_counted_once(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    watch = poolwatch.watch({"rw": engine}, autocommit, {"rw": copy.copy(engine)}, registry=registry)
    try:
        assert watch.pool_names == ["rw"]
        with autocommit.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        samples = scrape(registry)
        assert samples.value("poolwatch_checkouts_total", pool="rw") == 2
        assert samples.value("poolwatch_connections", pool="rw", state="used") == 0
    finally:
        watch.close()


def test_two_engines_with_pools_of_their_own_may_have_two_names(
    engine: sa.Engine, sync_url: str, registry: CollectorRegistry
) -> None:
    other = sa.create_engine(sync_url, pool_size=1)
    try:
        watch = poolwatch.watch({"rw": engine, "ro": other}, registry=registry)
        assert watch.pool_names == ["rw", "ro"]
        watch.close()
    finally:
        other.dispose()
