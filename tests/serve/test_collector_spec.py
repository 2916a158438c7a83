"""The metric catalogue: each family's exposed name, kind, help text and label names.

``SPECS`` is built from ``_spec`` entries when the module is imported, before any test runs, so
mutation testing (which swaps a mutant in after import) sees ``_spec`` only when a test calls it:
the first tests do, the last one checks that what is exposed is what the catalogue says. No
database: a real QueuePool over a DBAPI that talks to none.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import poolwatch
from poolwatch._serve.collector import SPECS, Spec, _spec
from tests.fake_dbapi import engine_for_test


def test_an_entry_keeps_its_name_kind_help_and_label_names_in_order() -> None:
    spec = _spec("poolwatch_orders_total", "counter", "Orders placed.", "pool", "route", "method")
    assert spec == Spec("poolwatch_orders_total", "counter", "Orders placed.", ("pool", "route", "method"))
    assert (spec.name, spec.kind, spec.help) == ("poolwatch_orders_total", "counter", "Orders placed.")
    assert spec.labels == ("pool", "route", "method")


def test_an_entry_without_label_names_has_an_empty_tuple() -> None:
    spec = _spec("poolwatch_capacity", "gauge", "Total tokens.")
    assert spec == Spec("poolwatch_capacity", "gauge", "Total tokens.", ())
    assert spec.labels == () and isinstance(spec.labels, tuple)


def test_the_catalogue_is_keyed_by_exposed_name() -> None:
    assert all(name == spec.name for name, spec in SPECS.items())
    assert SPECS["poolwatch_checkouts_total"] == _spec(
        "poolwatch_checkouts_total", "counter", "Checkouts.", "pool"
    )
    assert SPECS["poolwatch_use_seconds"] == _spec(
        "poolwatch_use_seconds", "histogram", "Time a connection was held, checkout to checkin.",
        "pool", "route", "method",
    )  # fmt: skip


def test_every_family_is_exposed_with_the_catalogues_kind_help_and_labels() -> None:
    with engine_for_test() as (engine, _):
        registry = CollectorRegistry()
        watch = poolwatch.watch(engine, registry=registry, name="fake")
        with engine.connect():
            pass
        text = generate_latest(registry).decode()
        watch.close()
    exposed = {family.name: family for family in text_string_to_metric_families(text)}
    for spec in SPECS.values():
        # prometheus_client names a counter's family without _total, its samples with it.
        family = exposed[spec.name.removesuffix("_total") if spec.kind == "counter" else spec.name]
        assert (family.type, family.documentation) == (spec.kind, spec.help), spec.name
        for sample in family.samples:
            if sample.name.endswith(("_created", "_gsum", "_gcount")):
                continue
            extra = {"le"} if sample.name.endswith("_bucket") else set()
            assert set(sample.labels) - extra == set(spec.labels), sample  # the parser sorts them
    assert len(exposed) == len(SPECS)
