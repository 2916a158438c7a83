"""The collector's contract with a registry, with no database: ``describe()`` names every family
from the catalogue, so a registry refuses a clash without running a scrape."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge

import poolwatch
from poolwatch._log import internal_errors
from poolwatch._record.recorder import PoolRecorder
from poolwatch._serve.collector import SPECS, PoolWatchCollector
from tests.fake_dbapi import engine_for_test


def test_describe_names_what_collect_yields() -> None:
    with engine_for_test() as (engine, _):
        watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="fake")
        collector = watch.direct_collector
        assert collector is not None
        described = [(family.name, family.type, family.samples) for family in collector.describe()]
        collected = [(family.name, family.type) for family in collector.collect()]
        watch.close()
    assert [(name, kind) for name, kind, _ in described] == collected
    assert all(samples == [] for _, _, samples in described)
    assert len(described) == len(SPECS)


def test_a_registry_asks_describe_instead_of_reading_the_pools() -> None:
    reads: list[int] = []

    def recorders() -> list[tuple[str, PoolRecorder]]:
        reads.append(1)
        return []

    registry = CollectorRegistry(auto_describe=True)  # as prometheus_client's global REGISTRY
    registry.register(PoolWatchCollector(recorders))
    assert reads == []


def test_a_name_clash_is_refused_at_registration() -> None:
    registry = CollectorRegistry()
    Gauge("poolwatch_connections", "the application's own, by mistake", registry=registry)
    with engine_for_test() as (engine, _):
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            poolwatch.watch(engine, registry=registry)
        # Nothing was left behind: the engine is watched afresh elsewhere, and counted once.
        watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="fine")
        engine.pool.connect().close()
        assert watch.recorders[0].snapshot().checkouts == 1
        watch.close()


def _samples(collector: PoolWatchCollector) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in collector.collect() for s in family.samples]


def test_a_failed_read_yields_the_internal_error_count_alone_and_never_raises() -> None:
    """A scrape must answer even when reading the pools fails: the failure is counted, and the
    count is all this collector yields (the registry's other collectors are still served)."""

    def broken() -> list[tuple[str, PoolRecorder]]:
        raise RuntimeError("reading the pools failed")

    before = internal_errors.count
    samples = _samples(PoolWatchCollector(broken))
    assert samples == [("poolwatch_internal_errors_total", {}, float(before + 1))]
    assert internal_errors.count == before + 1


def test_a_collector_without_an_app_loop_or_requests_reads_without_failing() -> None:
    """As ``watch()`` without an app makes it: no loop to read threads from, no request stats."""
    before = internal_errors.count
    with engine_for_test() as (engine, _):
        watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="plain")
        samples = _samples(PoolWatchCollector(lambda: [("plain", r) for r in watch.recorders]))
        watch.close()
    assert internal_errors.count == before
    names = {name for name, _, _ in samples}
    assert "poolwatch_checkouts_total" in names
    assert not any(name.startswith(("poolwatch_threadpool", "poolwatch_request_queries")) for name in names)
    assert ("poolwatch_internal_errors_total", {}, float(before)) in samples
