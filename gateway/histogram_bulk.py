"""Many observations into one prometheus Histogram child at once.

A finished stream observes each of its inter-token gaps (vLLM's ITL histogram): one
`Histogram.observe` per token, a Python loop over the buckets each time. Here the
gaps are counted per bucket first (bisect), then each touched bucket and the sum get
one increment: the same exposition, a few calls per request instead of one per token.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from typing import Any


def observe_many(child: Any, values: Sequence[float]) -> None:
    """`child.observe(v)` for each value (a labelled Histogram child, no exemplars)."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:  # another prometheus_client layout: the public way
            child.observe(v)
        return
    # observe() puts v in the first bucket with v <= bound: bisect_left's index.
    counts = Counter(bisect_left(bounds, v) for v in values if v == v)  # NaN: no bucket
    for i, n in counts.items():
        if i < len(buckets):
            buckets[i].inc(n)
    total.inc(sum(values))
