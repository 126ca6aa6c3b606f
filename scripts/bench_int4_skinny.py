"""The skinny W4A16 GEMM (issue 14: cuda/int4_mma_gemv.cu's mma_skinny_* on the rows layout,
cuda/int4_v4_gemv.cu's v4_skinny_* on the stream layout) against today's path
(HEADRACE_INT4_SKINNY_MAX=0: 8-row GEMV launches up to 32 rows, then dequantize into a
scratch buffer + cuBLAS) and cuBLAS bf16 on a bf16 weight of the same shape, on the Llama-3
8B and 70B linear shapes, each in the layout the loader gives it by default (stream up to
HEADRACE_INT4_STREAM_MAX weights: 8B's, 70B's qkv and o; rows: 70B's gate_up and down;
--layout forces one), M = 16 .. 512 rows of x: one line a shape x M, CUDA-graph replays
with L2 flushed before each (mean us), effective TB/s (the weight's own bytes, int4 with
scales and zeros or bf16, over the time) and the skinny path's speedup over today's; at
M = 64 also every (TW, WK) block shape. The skinny column runs the skinny kernel for every
M here, also past the default HEADRACE_INT4_SKINNY_MAX (32) and at 16 rows
(HEADRACE_INT4_SKINNY_MIN's A/B): where its speedup drops under 1 is where the rule's
bounds belong. <= 60 s on an H200.

    python scripts/bench_int4_skinny.py [--shapes 70b.gate_up ...] [--rows 16 64 ...]
        [--layout default|rows|stream] [--output-json F]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial

import torch

from cuda import int4_gemm as ig
from cuda import int4_mma_gemv as mg
from cuda import int4_v4_gemv as v4
from headrace.bench import gpu_timing
from scripts.int4_bench import default_layout, random_weight

DEVICE = "cuda"  # tests/test_bench_int4_skinny.py runs this on CPU
SHAPES = gpu_timing.LLAMA_LINEAR_SHAPES
ROWS = (16, 32, 64, 128, 256, 512)
ITERS = 30
VARIANT_ROWS = 64  # the row count at which every (TW, WK) block shape is timed too
timed = gpu_timing.mean_time  # (fn, iters): mean seconds, L2 flushed before each call
graphed = gpu_timing.graphed
# (HEADRACE_INT4_SKINNY_MIN, HEADRACE_INT4_SKINNY_MAX) of each int4 path
PATHS = {"today": (9, 0), "skinny": (9, 1 << 30)}


def on_path(path: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with int4_linear's skinny bounds of `path` (set at call time: a graph captures
    the dispatch then), on the rows layout's default GEMV (v4 runs round 3 on rows weights)."""

    def run() -> object:
        ig.GEMV_IMPL = "v4"
        ig.SKINNY_MIN_ROWS, ig.SKINNY_MAX_ROWS = PATHS[path]
        ig.SKINNY_STREAM = True
        ig.TILED_MAX_ROWS = 0  # the paths it compared (scripts/bench_int4_tiled.py adds tiled)
        return fn()

    return run


def today_label(m: int) -> str:
    return f"{-(-m // mg.MAX_ROWS)} GEMVs" if m <= ig.MMA_MAX_ROWS else "dequant+cuBLAS"


def shape_rows(name: str, rows: tuple[int, ...], group_size: int, layout: str) -> list[dict]:
    n, k = SHAPES[name]
    layout = default_layout(n, k, group_size) if layout == "default" else layout
    w = random_weight(n, k, group_size, DEVICE)
    w = w.as_stream() if layout == "stream" else w
    q_bytes = w.qw.numel() * 4 + w.scales.numel() * 2 + w.zeros.numel()
    wb = torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE)
    scratch = torch.empty(n, k, dtype=torch.bfloat16, device=DEVICE)  # as the model passes one
    x = torch.randn(max(rows), k, dtype=torch.bfloat16, device=DEVICE)
    y = torch.empty(max(rows), n, dtype=torch.bfloat16, device=DEVICE)
    sms = mg._sms(x.device)
    out = []
    for m in rows:
        xm, ym = x[:m], y[:m]
        calls: dict[str, Callable[[], object]] = {
            "today": on_path("today", partial(ig.int4_linear, xm, w, scratch, ym)),
            "skinny": on_path("skinny", partial(ig.int4_linear, xm, w, scratch, ym)),
            "cublas_bf16": partial(torch.nn.functional.linear, xm, wb),
        }
        us = {lb: timed(graphed(fn), ITERS) * 1e6 for lb, fn in calls.items()}
        read = {"today": q_bytes, "skinny": q_bytes, "cublas_bf16": n * k * 2}
        out.append(
            dict(
                shape=name,
                layout=layout,
                n=n,
                k=k,
                m=m,
                graph_us=us,
                tb_s={lb: read[lb] / (t * 1e-6) / 1e12 for lb, t in us.items()},
                speedup=us["today"] / us["skinny"],
                today=today_label(m),
                skinny=mg.skinny_explain(n, k, m, sms),
                passes=len(mg.skinny_chunks(m)),
            )
        )
        if m == VARIANT_ROWS:  # every block shape at one row count: the rule's check
            run = v4.skinny if layout == "stream" else mg.skinny
            out[-1]["shapes_us"] = {
                f"t{tw}_w{wk}": timed(graphed(partial(run, xm, w, ym, (tw, wk))), ITERS) * 1e6
                for tw, wk in mg.SKINNY_SHAPES
            }
    del w, wb, scratch
    return out


def summary(r: dict) -> str:
    us, tb = r["graph_us"], r["tb_s"]
    shapes = r.get("shapes_us")
    tail = ""
    if shapes:
        best = min(shapes, key=shapes.__getitem__)
        listing = "  ".join(f"{lb} {t:.1f}" for lb, t in shapes.items())
        tail = f"\n    block shapes at M={r['m']} us: {listing} -> best {best}"
    line = " | ".join(
        [
            f"{r['shape']:11s} {r['layout']:6s} M={r['m']:<3d}",
            f"today[{r['today']}] {us['today']:7.1f}us {tb['today']:4.2f}TB/s",
            f"skinny {us['skinny']:7.1f}us {tb['skinny']:4.2f}TB/s {r['speedup']:4.2f}x",
            f"cuBLAS bf16 {us['cublas_bf16']:7.1f}us {tb['cublas_bf16']:4.2f}TB/s",
            f"[{r['passes']} passes: {r['skinny']}]",
        ]
    )
    return line + tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", nargs="*", type=int, default=list(ROWS))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--layout", choices=["default", "rows", "stream"], default="default")
    ap.add_argument("--output-json")
    args = ap.parse_args()
    saved = (
        ig.GEMV_IMPL,
        ig.SKINNY_MIN_ROWS,
        ig.SKINNY_MAX_ROWS,
        ig.SKINNY_STREAM,
        ig.TILED_MAX_ROWS,
    )
    print(f"int4 skinny GEMM vs today vs cuBLAS bf16, group {args.group_size}, graphs, L2 flushed")
    results = []
    try:
        for name in args.shapes:
            for r in shape_rows(name, tuple(args.rows), args.group_size, args.layout):
                results.append(r)
                print(summary(r), flush=True)
    finally:
        (
            ig.GEMV_IMPL,
            ig.SKINNY_MIN_ROWS,
            ig.SKINNY_MAX_ROWS,
            ig.SKINNY_STREAM,
            ig.TILED_MAX_ROWS,
        ) = saved
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(group_size=args.group_size, rows=results), f, indent=1)


if __name__ == "__main__":
    main()
