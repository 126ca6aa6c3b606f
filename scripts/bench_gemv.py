"""Small-M GEMVs against cuBLAS (F.linear, its split-K reduce included) on the Llama-3-8B and
70B linear shapes at M = 1, 2, 4, 8 rows, bf16: microseconds, TB/s of weight read, and the
fraction of the device's copy bandwidth, L2 flushed before each call, CUDA events around
one replay of a CUDA graph holding the call (as the decode graphs run them). Side by
side: cuBLAS, round 1 (cuda/gemv.cu, HEADRACE_GEMV=old), round 2 (cuda/gemv_step.cu, the
default plan) and round 2's other (rows per warp, chunks in flight) variants at M = 1, with
what the rule (HEADRACE_GEMV=auto) picks.

Then the batch-1 fusions (M = 1): add_rms_norm + cuBLAS q/k/v against gemv2_norm, cuBLAS o +
add_rms_norm's add against gemv2 with the residual epilogue, add_rms_norm + cuBLAS gate/up +
silu_and_mul against gemv2_norm_pair, silu_and_mul + cuBLAS down against gemv2_silu (+
residual), each pair timed as one CUDA graph (launch gaps included); and four dependent
GEMVs of a layer captured without and with HEADRACE_PDL=1.

The last line says which weight-size threshold the numbers support for the rule: the
largest weight size up to which round 2 is at least as fast as cuBLAS at every M (and
above which cuBLAS wins somewhere). Edit cuda/gemv.py GEMV2_MAX_WEIGHT_BYTES to it.

    python scripts/bench_gemv.py [--iters 30] [--shapes 8b] [--output-json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from cuda import gemv, gemv_step
from cuda.fused_ops import add_rms_norm, silu_and_mul
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


def timed_graph(fn: Callable[[], object], iters: int) -> float:
    """timed() of fn captured in a CUDA graph: the kernels' time as a decode graph replays
    them, without Python's launch cost in the window (cuBLAS's reduce kernel included)."""
    return timed(gpu_timing.graphed(fn), iters)


def copy_bandwidth() -> float:
    return gpu_timing.copy_bandwidth()


def suggest_threshold(rows: list[dict]) -> int:
    """Largest weight size (bytes) with the GEMV no slower than cuBLAS at every M for all
    shapes of that size or less; 0 if it loses on the smallest."""
    by_size: dict[int, bool] = {}
    for r in rows:
        wins = r["gemv2_us"] <= r["cublas_us"]
        by_size[r["weight_bytes"]] = by_size.get(r["weight_bytes"], True) and wins
    best = 0
    for size in sorted(by_size):
        if not by_size[size]:
            break
        best = size
    return best


def measure(name: str, n: int, k: int, m: int, iters: int, bw: float) -> dict:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    size = n * k * 2
    row: dict = {"shape": name, "n": n, "k": k, "m": m, "weight_bytes": size}
    row["cublas_us"] = timed_graph(partial(F.linear, x, w), iters) * 1e6
    row["gemv_us"] = timed_graph(partial(gemv.gemv, x, w, None, out), iters) * 1e6
    row["gemv2_us"] = timed_graph(partial(gemv_step.gemv2, x, w, None, None, out), iters) * 1e6
    row["gemv2_variant"] = "r{}u{}".format(*gemv_step.chosen_variant("", m, n, k, torch.bfloat16))
    if m == 1:
        for v in gemv_step.VARIANTS:
            fn = partial(gemv_step.gemv2, x, w, None, None, out, v)
            row[f"gemv2_r{v[0]}u{v[1]}_us"] = timed_graph(fn, iters) * 1e6
    ref = F.linear(x, w)
    row["max_abs_diff"] = (gemv_step.gemv2(x, w) - ref).abs().max().item()
    row["rule"] = "gemv2" if gemv.use_gemv(m, n, k, 2, "auto") else "cublas"
    for key in ("cublas", "gemv", "gemv2"):
        row[f"{key}_tbps"] = size / row[f"{key}_us"] / 1e6
    return row


def print_row(r: dict, bw: float) -> None:
    size = r["weight_bytes"]

    def cell(us: float) -> str:
        return f"{us:>7.1f} {size / us / 1e6:>5.2f} {size / us / 1e6 / (bw / 1e12):>5.0%}"

    variants = " ".join(
        f"r{v[0]}u{v[1]} {r[f'gemv2_r{v[0]}u{v[1]}_us']:.1f}"
        for v in gemv_step.VARIANTS
        if f"gemv2_r{v[0]}u{v[1]}_us" in r
    )
    print(
        f"{r['shape']:<12} {r['n']:>6} {r['k']:>6} {r['m']:>2} {size / 2**20:>5.0f} | "
        f"{cell(r['cublas_us'])} | {cell(r['gemv_us'])} | {cell(r['gemv2_us'])} | "
        f"{r['cublas_us'] / r['gemv2_us']:>5.2f}x {r['rule']:<6} {r['gemv2_variant']} | {variants}"
    )


def fused_pairs(iters: int) -> list[dict]:
    """The batch-1 fusions, unfused vs fused, each as one graph replay (8B shapes, M = 1)."""
    bf = torch.bfloat16
    h = torch.randn(1, 4096, device="cuda", dtype=bf)
    res = torch.randn(1, 4096, device="cuda", dtype=bf)
    nw = torch.ones(4096, device="cuda", dtype=bf)
    qkv = torch.randn(6144, 4096, device="cuda", dtype=bf) * 0.02
    o = torch.randn(4096, 4096, device="cuda", dtype=bf) * 0.02
    down = torch.randn(4096, 14336, device="cuda", dtype=bf) * 0.02
    gu = torch.randn(1, 28672, device="cuda", dtype=bf)
    gu_w = torch.randn(28672, 4096, device="cuda", dtype=bf) * 0.02
    cases = {
        "add_rms_norm + qkv": (
            lambda: F.linear(add_rms_norm(h, res, nw, 1e-5)[0], qkv),
            lambda: gemv_step.gemv2_norm(h, nw, 1e-5, qkv),
        ),
        "o + residual add": (
            lambda: add_rms_norm(F.linear(h, o), res, nw, 1e-5),
            lambda: gemv_step.gemv2(h, o, None, res),
        ),
        "add_rms_norm + gate_up + silu": (
            lambda: silu_and_mul(F.linear(add_rms_norm(h, res, nw, 1e-5)[0], gu_w)),
            lambda: gemv_step.gemv2_norm_pair(h, nw, 1e-5, gu_w),
        ),
        "silu_and_mul + down + add": (
            lambda: add_rms_norm(F.linear(silu_and_mul(gu), down), res, nw, 1e-5),
            lambda: gemv_step.gemv2_silu(gu, down, None, res),
        ),
    }
    rows = []

    def layer() -> object:  # four dependent round-2 GEMVs of a layer at batch 1
        q = gemv_step.gemv2_norm(h, nw, 1e-5, qkv)
        hid = gemv_step.gemv2(q[:, :4096], o, None, h)
        gemv_step.gemv2_norm(hid, nw, 1e-5, o)  # stands in for gate/up (on cuBLAS)
        return gemv_step.gemv2_silu(gu, down, None, hid)

    for name, (unfused, fused) in cases.items():
        a = timed_graph(unfused, iters) * 1e6
        b = timed_graph(fused, iters) * 1e6
        rows.append({"case": name, "unfused_us": a, "fused_us": b})
        print(f"{name:<28} unfused {a:>7.1f} us   fused {b:>7.1f} us   saves {a - b:>5.1f} us")
    for flag in ("0", "1"):  # the same graph captured without and with PDL
        os.environ["HEADRACE_PDL"] = flag
        try:
            t = timed_graph(layer, iters) * 1e6
        except Exception as exc:  # a driver or cuda.core without PDL in graphs: say so
            print(f"layer chain, HEADRACE_PDL={flag}: failed: {exc!r}")
            continue
        finally:
            os.environ.pop("HEADRACE_PDL")
        rows.append({"case": f"layer chain, HEADRACE_PDL={flag}", "us": t})
        print(f"{'layer chain, PDL ' + flag:<28} {t:>7.1f} us (qkv+norm, o+res, norm, down)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--shapes", default="", help="only shapes starting with this (8b, 70b)")
    ap.add_argument("--output-json")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s, bf16, L2 flushed")
    cols = f"{'us':>7} {'TB/s':>5} {'%copy':>5}"
    print(
        f"{'shape':<12} {'N':>6} {'K':>6} {'M':>2} {'MiB':>5} | cuBLAS {cols[7:]} | "
        f"round 1 {cols[8:]} | round 2 {cols[8:]} | vs cuBLAS, rule, variant | variants (us, M=1)"
    )
    rows = []
    for name, (n, k) in SHAPES.items():
        if not name.startswith(args.shapes):
            continue
        for m in ROWS:
            row = measure(name, n, k, m, args.iters, bw)
            rows.append(row)
            print_row(row, bw)
    best = suggest_threshold(rows)
    print(
        f"rule: GEMV2_MAX_WEIGHT_BYTES is {gemv.GEMV2_MAX_WEIGHT_BYTES / 2**20:.0f} MiB; these "
        f"numbers support {best / 2**20:.0f} MiB (round 2 no slower than cuBLAS at every M up to it)"
    )
    fused = fused_pairs(args.iters)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(
                {"copy_bandwidth": bw, "rows": rows, "suggested_max_bytes": best, "fused": fused},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
