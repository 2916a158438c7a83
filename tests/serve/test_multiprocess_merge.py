"""How workers' numbers merge into one scrape, directly (no database, no processes): counters and
histograms add up over every worker, dead ones included; gauges over live workers only, summed,
except the oldest checkout age and pool_info, which take the largest; the newest exemplar wins."""

from __future__ import annotations

from typing import Any

from poolwatch._serve.multiprocess import _Merged

Sample = list[Any]


def _merged(
    *workers: tuple[bool, list[tuple[str, str, list[Sample]]]],
) -> dict[tuple[str, frozenset[Any]], Any]:
    merged = _Merged()
    for live, families in workers:
        for name, kind, samples in families:
            merged.add(name, kind, f"{name} help", "", samples, live)
    return {
        (sample.name, frozenset(sample.labels.items())): (sample.value, sample.exemplar)
        for family in merged.metrics()
        for sample in family.samples
    }


def _worker(
    checkouts: float, used: float, oldest: float, exemplar: Any = None
) -> list[tuple[str, str, list[Sample]]]:
    return [
        ("poolwatch_checkouts", "counter", [["poolwatch_checkouts_total", {"pool": "p"}, checkouts, None]]),
        ("poolwatch_connections", "gauge", [["poolwatch_connections", {"state": "used", "pool": "p"}, used, None]]),
        ("poolwatch_oldest_checkout_age_seconds", "gauge",
         [["poolwatch_oldest_checkout_age_seconds", {"pool": "p"}, oldest, None]]),
        ("poolwatch_use_seconds", "histogram",
         [["poolwatch_use_seconds_bucket", {"pool": "p", "le": "0.1"}, checkouts, exemplar],
          ["poolwatch_use_seconds_count", {"pool": "p"}, checkouts, None]]),
    ]  # fmt: skip


def _key(name: str, **labels: str) -> tuple[str, frozenset[Any]]:
    return name, frozenset(labels.items())


def test_counters_sum_over_all_workers_and_gauges_over_live_ones() -> None:
    values = _merged(
        (True, _worker(checkouts=3, used=1, oldest=2.0)),
        (True, _worker(checkouts=4, used=2, oldest=7.5)),
        (False, _worker(checkouts=10, used=5, oldest=99.0)),  # a dead worker's gauges are gone
    )
    assert values[_key("poolwatch_checkouts_total", pool="p")][0] == 17
    assert values[_key("poolwatch_use_seconds_count", pool="p")][0] == 17
    assert values[_key("poolwatch_use_seconds_bucket", pool="p", le="0.1")][0] == 17
    assert values[_key("poolwatch_connections", pool="p", state="used")][0] == 3
    assert values[_key("poolwatch_oldest_checkout_age_seconds", pool="p")][0] == 7.5


def test_labels_in_another_order_are_the_same_series() -> None:
    first = [
        (
            "poolwatch_connections",
            "gauge",
            [["poolwatch_connections", {"pool": "p", "state": "idle"}, 1, None]],
        )
    ]
    second = [
        (
            "poolwatch_connections",
            "gauge",
            [["poolwatch_connections", {"state": "idle", "pool": "p"}, 2, None]],
        )
    ]
    values = _merged((True, first), (True, second))
    assert list(values) == [_key("poolwatch_connections", pool="p", state="idle")]
    assert values[_key("poolwatch_connections", pool="p", state="idle")][0] == 3


def test_the_newest_exemplar_wins() -> None:
    older = [{"trace_id": "a" * 32}, 0.05, 1000.0]
    newer = [{"trace_id": "b" * 32}, 0.07, 2000.0]
    values = _merged(
        (True, _worker(1, 0, 0, exemplar=newer)),
        (False, _worker(1, 0, 0, exemplar=older)),
    )
    exemplar = values[_key("poolwatch_use_seconds_bucket", pool="p", le="0.1")][1]
    assert exemplar.labels == {"trace_id": "b" * 32} and exemplar.timestamp == 2000.0
