"""observe_many gives the exposition of one observe() per value."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.histogram_bulk import observe_many
from gateway.vllm_metrics import ITL_BUCKETS


def test_bulk_observations_expose_what_one_by_one_ones_do() -> None:
    rng = random.Random(0)
    values = [rng.choice([0.0, 0.01, 0.025, 80.0, 1e6, -1.0]) for _ in range(50)]
    values += [rng.expovariate(20) for _ in range(500)]
    exposed = []
    for use_bulk in (False, True):
        reg = CollectorRegistry()
        h = Histogram("itl", "gaps", ["model"], buckets=ITL_BUCKETS, registry=reg)
        child = h.labels("m")
        if use_bulk:
            observe_many(child, values[:100])
            observe_many(child, values[100:])
            observe_many(child, [])
        else:
            for v in values:
                child.observe(v)
        exposed.append(generate_latest(reg).decode().splitlines())
    one, bulk = ([line for line in e if "_bucket" in line or "_count" in line] for e in exposed)
    assert one == bulk and len(one) == len(ITL_BUCKETS) + 2  # + Inf bucket, count
    assert 'itl_bucket{le="0.01",model="m"} ' in "\n".join(one)
    sums = [
        float(next(line for line in e if line.startswith("itl_sum")).split()[-1]) for e in exposed
    ]
    assert abs(sums[0] - sums[1]) < 1e-6 * abs(sums[0])  # the order of the additions differs


def test_another_layout_falls_back_to_observe() -> None:
    seen: list[float] = []

    class Child:
        def observe(self, v: float) -> None:
            seen.append(v)

    observe_many(Child(), [0.5, 2.0])
    assert seen == [0.5, 2.0]
