"""The tiled W4A16 GEMM (issue 14: cuda/int4_tiled_gemm.cu, HEADRACE_INT4_TILED_MAX) against
today's path (the defaults: 8-row GEMVs / skinny up to 32 rows, then dequantize into a
scratch buffer + cuBLAS), the skinny GEMM (launches of 64 rows, at every M) and cuBLAS bf16 on
a bf16 weight of the same shape, on the Llama-3 8B and 70B linear shapes, M = 33 .. 512: one
line a shape x M, CUDA-graph replays with L2 flushed before each (mean us), effective TB/s
(the weight's own bytes over the time) and tiled's speedup over today and over cuBLAS bf16; at
M = 64 also tiled with each forced K split (the split rule's check).

Every path runs in the layout the loader gives the shape by default (stream up to
HEADRACE_INT4_STREAM_MAX weights: 8B's, 70B's qkv and o; rows: 70B's gate_up and down;
tiled has a kernel for each). <= 60 s on an H200.

    python scripts/bench_int4_tiled.py [--shapes 70b.gate_up ...] [--rows 64 256 ...]
        [--output-json F]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial

import torch

from cuda import int4_gemm as ig
from cuda import int4_tiled_gemm as tg
from headrace.bench import gpu_timing
from scripts.int4_bench import default_layout, random_weight

DEVICE = "cuda"  # tests/test_bench_int4_tiled.py runs this on CPU
SHAPES = gpu_timing.LLAMA_LINEAR_SHAPES
ROWS = (33, 64, 128, 256, 512)
ITERS = 20
SPLIT_ROWS = 64  # the row count at which every forced split is timed too
SPLITS = (1, 2, 4, 8)
timed = gpu_timing.mean_time  # (fn, iters): mean seconds, L2 flushed before each call
graphed = gpu_timing.graphed
# int4_linear's switches per path: (SKINNY_MIN_ROWS, SKINNY_MAX_ROWS, TILED_MAX_ROWS)
PATHS = {"today": (17, 32, 0), "skinny": (9, 1 << 30, 0), "tiled": (17, 32, 1 << 30)}
SWITCHES = ("GEMV_IMPL", "SKINNY_MIN_ROWS", "SKINNY_MAX_ROWS", "SKINNY_STREAM", "TILED_MAX_ROWS")


def on_path(path: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with int4_linear's switches of `path` (set at call time: a graph captures the
    dispatch then), HEADRACE_INT4_GEMV=v4 (round 3 on rows weights)."""

    def run() -> object:
        ig.GEMV_IMPL = "v4"
        ig.SKINNY_MIN_ROWS, ig.SKINNY_MAX_ROWS, ig.TILED_MAX_ROWS = PATHS[path]
        ig.SKINNY_STREAM = True
        return fn()

    return run


def today_label(m: int) -> str:
    return "GEMVs/skinny" if m <= ig.MMA_MAX_ROWS else "dequant+cuBLAS"


def shape_rows(name: str, rows: tuple[int, ...], group_size: int) -> list[dict]:
    n, k = SHAPES[name]
    layout = default_layout(n, k, group_size)
    w = random_weight(n, k, group_size, DEVICE)
    w = w.as_stream() if layout == "stream" else w
    q_bytes = w.qw.numel() * 4 + w.scales.numel() * 2 + w.zeros.numel()
    wb = torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE)
    scratch = torch.empty(n, k, dtype=torch.bfloat16, device=DEVICE)  # as the model passes one
    x = torch.randn(max(rows), k, dtype=torch.bfloat16, device=DEVICE)
    y = torch.empty(max(rows), n, dtype=torch.bfloat16, device=DEVICE)
    sms = tg._sms(x.device) if DEVICE == "cuda" else tg.SMS
    out = []
    for m in rows:
        xm, ym = x[:m], y[:m]
        calls: dict[str, Callable[[], object]] = {
            "today": on_path("today", partial(ig.int4_linear, xm, w, scratch, ym)),
            "skinny": on_path("skinny", partial(ig.int4_linear, xm, w, scratch, ym)),
            "tiled": on_path("tiled", partial(ig.int4_linear, xm, w, scratch, ym)),
            "cublas_bf16": partial(torch.nn.functional.linear, xm, wb),
        }
        us = {lb: timed(graphed(fn), ITERS) * 1e6 for lb, fn in calls.items()}
        read = {lb: q_bytes for lb in ("today", "skinny", "tiled")} | {"cublas_bf16": n * k * 2}
        out.append(
            dict(
                shape=name,
                layout=layout,
                n=n,
                k=k,
                m=m,
                graph_us=us,
                tb_s={lb: read[lb] / (t * 1e-6) / 1e12 for lb, t in us.items()},
                speedup=us["today"] / us["tiled"],
                vs_cublas=us["cublas_bf16"] / us["tiled"],
                today=today_label(m),
                tiled=tg.explain(n, k, m, sms),
            )
        )
        if m == SPLIT_ROWS:  # every forced split at one row count: the rule's check
            out[-1]["splits_us"] = {
                f"S{s}": timed(graphed(partial(tg.gemm, xm, w, ym, s)), ITERS) * 1e6
                for s in SPLITS
                if s <= k // tg.KB
            }
    del w, wb, scratch
    return out


def summary(r: dict) -> str:
    us, tb = r["graph_us"], r["tb_s"]
    line = " | ".join(
        [
            f"{r['shape']:11s} {r['layout']:6s} M={r['m']:<3d}",
            f"today[{r['today']}] {us['today']:7.1f}us {tb['today']:4.2f}TB/s",
            f"skinny {us['skinny']:7.1f}us",
            f"tiled {us['tiled']:7.1f}us {tb['tiled']:4.2f}TB/s {r['speedup']:4.2f}x today "
            f"{r['vs_cublas']:4.2f}x cuBLAS",
            f"cuBLAS bf16 {us['cublas_bf16']:7.1f}us {tb['cublas_bf16']:4.2f}TB/s",
            f"[{r['tiled']}]",
        ]
    )
    splits = r.get("splits_us")
    if splits:
        best = min(splits, key=splits.__getitem__)
        listing = "  ".join(f"{lb} {t:.1f}" for lb, t in splits.items())
        line += f"\n    tiled splits at M={r['m']} us: {listing} -> best {best}"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", nargs="*", type=int, default=list(ROWS))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--output-json")
    args = ap.parse_args()
    saved = {s: getattr(ig, s) for s in SWITCHES}
    print(
        f"int4 tiled GEMM vs today vs skinny vs cuBLAS bf16, group {args.group_size}, "
        "graphs, L2 flushed"
    )
    results = []
    try:
        for name in args.shapes:
            for r in shape_rows(name, tuple(args.rows), args.group_size):
                results.append(r)
                print(summary(r), flush=True)
    finally:
        for s, v in saved.items():
            setattr(ig, s, v)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(group_size=args.group_size, rows=results), f, indent=1)


if __name__ == "__main__":
    main()
