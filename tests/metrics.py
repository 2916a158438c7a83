"""Reading metrics the way Prometheus does: render, then parse with prometheus_client's parsers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, dict[str, str]]
Key = tuple[str, frozenset[tuple[str, str]]]


def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample of the text exposition, keyed by (name, labels)."""
    text = generate_latest(registry).decode()
    return parse_text(text)


def parse_text(text: str) -> Samples:
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Samples(samples)


def scrape_openmetrics(registry: CollectorRegistry) -> Samples:
    text = generate_openmetrics(registry).decode()
    samples: dict[Key, float] = {}
    for family in parse_openmetrics(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Samples(samples)


class Samples(dict[Key, float]):
    """A dict of samples that also answers ``value(name, **labels)`` and iterates with dict labels."""

    def items(self) -> list[tuple[Sample, float]]:  # type: ignore[override]
        return [((name, dict(labels)), value) for (name, labels), value in super().items()]

    def value(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        if not super().__contains__(key):
            raise KeyError(f"no sample {name}{labels}; have {sorted({n for n, _ in self})}")
        return float(super().__getitem__(key))

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (as ``sum by``)."""
        return sum(value for _, value in self.find(name, **labels))

    def find(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Samples of ``name`` whose labels include ``labels``."""
        found = []
        for (sample_name, sample_labels), value in super().items():
            label_dict = dict(sample_labels)
            if sample_name == name and all(label_dict.get(k) == v for k, v in labels.items()):
                found.append((label_dict, value))
        return found


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return scrape(registry).value(name, **labels)
