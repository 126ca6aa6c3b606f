"""What the int4 benchmarks (scripts/bench_int4*.py) share: a random W4A16 weight in the rows
layout and the layout the loader gives a shape under HEADRACE_INT4_GEMV=v4. The device is an
argument: each bench keeps its own DEVICE, which its CPU test sets to "cpu"."""

from __future__ import annotations

import torch

from cuda import int4_gemm as ig
from cuda import int4_v4_gemv as v4


def random_weight(n: int, k: int, group_size: int, device: str) -> ig.Int4Weight:
    g = k // group_size
    return ig.Int4Weight(
        qw=torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device=device),
        scales=(torch.rand(n, g, device=device) * 0.01).half(),
        zeros=torch.randint(0, 16, (n, g), dtype=torch.uint8, device=device),
        group_size=group_size,
    )


def default_layout(n: int, k: int, group_size: int) -> str:
    """The loader's pick under HEADRACE_INT4_GEMV=v4 (worker/quant/int4_linear.py)."""
    stream = n * k <= ig.STREAM_MAX_WEIGHTS and v4.supported(n, k, group_size)
    return "stream" if stream else "rows"
