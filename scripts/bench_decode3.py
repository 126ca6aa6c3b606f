"""Decode attention, issue 11 round 3 / issue 13 W2 FP8 (gpu_bench step `decode3`): every
variant side by side in one call, Llama-3-8B heads (32 q / 8 KV, head_dim 128, block 16,
shuffled pages), CUDA-graph replays with L2 flushed (scripts/bench_decode.py's timing).

Per cell, % of the copy bandwidth measured in this call: old (CUDA-core kernels), v2 (the
default), each HEADRACE_DECODE_CONFIG variant (w2s3 w4s2 w4s3 w4s4), v3
(HEADRACE_DECODE_PLAN=v3); FP8 cells add f16 (HEADRACE_DECODE_FP8_MATH=f16 on v2) and v3+f16.
Cells: bf16 and FP8 at the issue's 64 x 1k / 4k / 16k and 8 x 16k, FP8 at W2's 256 x 1k,
512 x 2k and 1024 x 1.5k. Batch 1 at 128 / 200 / 1k tokens in a graph of 32 calls with a 128k
bound (W1's graphs: us a call). One line a cell; the JSON holds the splits too.

    PYTHONPATH=. python scripts/bench_decode3.py [--out bench_decode3.json]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from cuda import decode_attention as da
from headrace.bench.gpu_timing import copy_bandwidth
from scripts import bench_decode as bd  # timed, env, paged_batch: the same timing

ISSUE_CELLS = ((64, 1024), (64, 4096), (64, 16384), (8, 16384))
W2_CELLS = ((256, 1024), (512, 2048), (1024, 1536))
SHORT = (128, 200, 1024)
VARIANTS = ("w2s3", "w4s2", "w4s3", "w4s4")
NEW = {da.ENV: "new"}
V3 = NEW | {da.PLAN_ENV: "v3"}
F16 = {da.FP8_MATH_ENV: "f16"}


def runs_for(fp8: bool) -> dict[str, dict[str, str]]:
    """Name -> environment of every run of a cell."""
    runs = {"old": bd.OLD, "v2": NEW}
    runs |= {v: NEW | {da.CONFIG_ENV: v} for v in VARIANTS}
    runs["v3"] = V3
    if fp8:
        runs |= {"f16": NEW | F16, "v3+f16": V3 | F16}
    return runs


def cell(batch: int, ctx: int, fp8: bool, copy_bw: float) -> dict[str, Any]:
    b = bd.paged_batch(batch, ctx, fp8)
    row: dict[str, Any] = {"batch": batch, "ctx": ctx, "kv": "fp8" if fp8 else "bf16"}
    ref = None
    for name, values in runs_for(fp8).items():
        r = bd.timed([b], values, ctx)
        out = r.pop("out").float()
        ref = out if ref is None else ref
        diff = (out - ref).abs().max().item()
        row[name] = {"us": r["us"], "pct": 100 * bd._frac(r, b["kv_bytes"], copy_bw)}
        row[name] |= {"splits": r["splits"], "max_diff_vs_old": diff}
    best = max((n for n in row if isinstance(row[n], dict)), key=lambda n: row[n]["pct"])
    parts = " ".join(f"{n} {row[n]['pct']:.1f}" for n in runs_for(fp8))
    print(f"decode3 {row['kv']:4s} {batch:4d} x {ctx:5d}: {parts} | best {best}", flush=True)
    del b
    torch.cuda.empty_cache()
    return row


def short(ctx: int, fp8: bool) -> dict[str, Any]:
    bs = [bd.paged_batch(1, ctx, fp8) for _ in range(bd.LAYERS)]
    runs = {"old": bd.OLD, "v2": NEW, "w4s2": NEW | {da.CONFIG_ENV: "w4s2"}, "v3": V3}
    if fp8:
        runs["v3+f16"] = V3 | F16
    row: dict[str, Any] = {"batch": 1, "ctx": ctx, "kv": "fp8" if fp8 else "bf16"}
    for name, values in runs.items():
        r = bd.timed(bs, values, bd.SHORT_BOUND)
        row[name] = {"us": r["us"], "splits": r["splits"]}
    parts = " ".join(f"{n} {row[n]['us']:.2f}" for n in runs)
    print(
        f"decode3 {row['kv']:4s} batch 1 ctx {ctx:5d}, graph bound {bd.SHORT_BOUND}, "
        f"us a call: {parts}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_decode3.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e12:.2f} TB/s (pct below)")
    results: list[dict[str, Any]] = []
    # FP8 first (W2's path, what matters most), so a timeout still leaves its lines.
    for batch, ctx in W2_CELLS + ISSUE_CELLS:
        results.append(cell(batch, ctx, True, copy_bw))
    for fp8 in (True, False):
        for ctx in SHORT:
            results.append(short(ctx, fp8))
    for batch, ctx in ISSUE_CELLS:
        results.append(cell(batch, ctx, False, copy_bw))
    with open(args.out, "w") as f:
        json.dump(
            {"device": torch.cuda.get_device_name(), "copy_bw_Bps": copy_bw, "results": results},
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
