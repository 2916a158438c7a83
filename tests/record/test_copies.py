"""The copies a reader takes of the per-route counts while a nested checkin may add a route.

tests/test_gc_reentry.py provokes the nesting with the garbage collector, but a collection lands
only at some allocations, and the gap between the copy of the keys and the copy of the values
is not always one of them. Here the nested write is placed exactly in that gap: the dict adds its
key when the reader asks for its values, as a checkin finalized by a collection there would.
"""

from __future__ import annotations

from poolwatch._record.histogram import Histogram
from poolwatch._record.recorder import copy_counts, copy_histograms


class _GrowsWhenRead(dict[str, object]):
    """A dict that gains a key between the copy of its keys and the copy of its values."""

    def __init__(self, *args: object, new_key: str, new_value: object) -> None:
        super().__init__(*args)
        self._new = (new_key, new_value)

    def values(self):  # type: ignore[no-untyped-def]
        key, value = self._new
        self[key] = value
        return super().values()


def test_counts_copied_while_a_route_is_added_keep_every_key_with_its_own_count() -> None:
    counts = _GrowsWhenRead({"/a": 3, "/b": 5}, new_key="/new", new_value=1)
    copied = copy_counts(counts)  # type: ignore[arg-type]
    # The new route is seen at the next read; the keys copied pair with their own counts.
    assert copied == {"/a": 3, "/b": 5}
    assert copy_counts(counts) == {"/a": 3, "/b": 5, "/new": 1}  # type: ignore[arg-type]


def test_histograms_copied_while_a_route_is_added_keep_every_key_with_its_own_histogram() -> None:
    first, second, added = Histogram((0.1, 1.0)), Histogram((0.1, 1.0)), Histogram((0.1, 1.0))
    first.observe(0.05)
    second.observe(0.5)
    second.observe(0.5)
    histograms = _GrowsWhenRead({"/a": first, "/b": second}, new_key="/new", new_value=added)
    copied = copy_histograms(histograms)  # type: ignore[arg-type]
    assert list(copied) == ["/a", "/b"]
    assert copied["/a"].counts == [1, 0, 0]
    assert copied["/b"].counts == [0, 2, 0]
    assert copied["/b"].total == 1.0
