"""Timing GPU work for the micro-benchmarks: CUDA-event medians with L2 flushed, CUDA-graph
replays (kernels without Python's launch cost), and the measured copy bandwidth that the
kernels' fractions are taken of. torch is imported inside: `headrace --help` stays fast."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def time_op(
    fn: Callable[[], object],
    iters: int = 20,
    flush_mb: int = 256,
    warmup: int = 3,
    reduce: Callable[[list[float]], float] = statistics.median,
) -> float:
    """Seconds of fn() over iters runs (their median, or `reduce`), L2 flushed before each."""
    import torch

    flush = torch.empty(flush_mb << 20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return reduce(times)


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured in a CUDA graph: replays time the kernels, not Python's launch cost."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, bytes read plus written."""
    import torch

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n / time_op(lambda: dst.copy_(src), iters=10, flush_mb=64)


# Llama-3-8B / 70B linear layers as (N, K): what the GEMV benches (scripts/bench_int4*.py,
# bench_fp8_gemv.py) time. qkv and gate_up are the fused shards.
LLAMA_LINEAR_SHAPES = {
    "8b.qkv": (6144, 4096),
    "8b.o": (4096, 4096),
    "8b.gate_up": (28672, 4096),
    "8b.down": (4096, 14336),
    "70b.qkv": (10240, 8192),
    "70b.o": (8192, 8192),
    "70b.gate_up": (57344, 8192),
    "70b.down": (8192, 28672),
}


def mean_time(fn: Callable[[], object], iters: int = 50) -> float:
    """Mean seconds per call, L2 flushed before each call (weights come from HBM)."""
    return time_op(fn, iters, reduce=statistics.fmean)
