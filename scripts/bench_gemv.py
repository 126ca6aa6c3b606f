"""Small-M GEMV (cuda/gemv.py) against cuBLAS (F.linear, its split-K reduce included) on the
Llama-3-8B and 70B linear shapes at M = 1, 2, 4, 8 rows, bf16: microseconds, TB/s of weight
read, and the fraction of the device's copy bandwidth, L2 flushed before each call, CUDA
events; old and new side by side, with what the rule (HEADRACE_GEMV=auto) picks.

The last line says which weight-size threshold the numbers support for the rule: the
largest weight size up to which the GEMV is at least as fast as cuBLAS at every M (and
above which cuBLAS wins somewhere). Edit cuda/gemv.py GEMV_MAX_WEIGHT_BYTES to it.

    python scripts/bench_gemv.py [--iters 30] [--output-json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from cuda import gemv
from headrace.bench import gpu_timing

SHAPES = {  # name: (N, K)
    "8b.qkv": (6144, 4096),
    "8b.o": (4096, 4096),
    "8b.gate_up": (28672, 4096),
    "8b.down": (4096, 14336),
    "8b.lm_head": (128256, 4096),
    "70b.qkv": (10240, 8192),
    "70b.o": (8192, 8192),
    "70b.gate_up": (57344, 8192),
    "70b.down": (8192, 28672),
}
ROWS = (1, 2, 4, 8)


def timed(fn: Callable[[], object], iters: int) -> float:
    """Mean seconds per call, L2 flushed before each (the weight comes from HBM)."""
    return gpu_timing.time_op(fn, iters, reduce=statistics.fmean)


def copy_bandwidth() -> float:
    return gpu_timing.copy_bandwidth()


def suggest_threshold(rows: list[dict]) -> int:
    """Largest weight size (bytes) with the GEMV no slower than cuBLAS at every M for all
    shapes of that size or less; 0 if it loses on the smallest."""
    by_size: dict[int, bool] = {}
    for r in rows:
        wins = r["gemv_us"] <= r["cublas_us"]
        by_size[r["weight_bytes"]] = by_size.get(r["weight_bytes"], True) and wins
    best = 0
    for size in sorted(by_size):
        if not by_size[size]:
            break
        best = size
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--output-json")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s, bf16, L2 flushed")
    print(
        f"{'shape':<12} {'N':>6} {'K':>6} {'M':>2} {'MiB':>5} | {'cuBLAS us':>9} {'TB/s':>5} "
        f"{'%copy':>5} | {'GEMV us':>8} {'TB/s':>5} {'%copy':>5} | {'speedup':>7} rule"
    )
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            t_cublas = timed(partial(F.linear, x, w), args.iters)
            t_gemv = timed(partial(gemv.gemv, x, w, None, out), args.iters)
            err = (gemv.gemv(x, w) - F.linear(x, w)).abs().max().item()
            size = n * k * 2
            rule = "gemv" if gemv.use_gemv(m, n, k, 2, "auto") else "cublas"
            row = {
                "shape": name,
                "n": n,
                "k": k,
                "m": m,
                "weight_bytes": size,
                "cublas_us": t_cublas * 1e6,
                "gemv_us": t_gemv * 1e6,
                "cublas_tbps": size / t_cublas / 1e12,
                "gemv_tbps": size / t_gemv / 1e12,
                "max_abs_diff": err,
                "rule": rule,
            }
            rows.append(row)
            print(
                f"{name:<12} {n:>6} {k:>6} {m:>2} {size / 2**20:>5.0f} | "
                f"{row['cublas_us']:>9.1f} {row['cublas_tbps']:>5.2f} {size / t_cublas / bw:>5.0%} | "
                f"{row['gemv_us']:>8.1f} {row['gemv_tbps']:>5.2f} {size / t_gemv / bw:>5.0%} | "
                f"{t_cublas / t_gemv:>6.2f}x {rule}"
            )
    best = suggest_threshold(rows)
    print(
        f"rule: GEMV_MAX_WEIGHT_BYTES is {gemv.GEMV_MAX_WEIGHT_BYTES / 2**20:.0f} MiB; these numbers "
        f"support {best / 2**20:.0f} MiB (GEMV no slower than cuBLAS at every M up to that size)"
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(
                {"copy_bandwidth": bw, "rows": rows, "suggested_max_bytes": best}, f, indent=1
            )


if __name__ == "__main__":
    main()
