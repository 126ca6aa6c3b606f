"""Decode attention at the W2 FP8 step's shape (issue 13): why the model's step reads its FP8
KV at ~84% of the copy bandwidth (762 us a layer at 880 rows x 1.5k) where
`bench_decode3.py`'s 1024 x 1.5k cell reads at ~89%.

One cell per line, FP8 KV (scale 1), Llama-3-8B heads, shuffled pages, CUDA-graph replays
with L2 flushed (scripts/bench_decode.py's timing), % of the copy bandwidth measured here:

- rows 880 / 896 / 1024 at 1,500 tokens each, the graph bound = the context (the bench's
  way) and = 4,096 (the W2 run's --max-model-len: its decode graphs' bound);
- 880 rows with contexts drawn from 1,000 .. 2,000 (a W2 decode step's spread) at bound 4096;
- per cell the default plan (v3: its variant by grid size) and each forced variant.

    PYTHONPATH=. python scripts/bench_decode_w2.py [--out bench_decode_w2.json]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from cuda import decode_attention as da
from headrace.bench.gpu_timing import copy_bandwidth
from scripts import bench_decode as bd

CONTEXT = 1500
BOUND = 4096
VARIANTS = ("w2s3", "w3s3", "w4s3", "w4s4")


def spread_batch(rows: int, lo: int, hi: int, seed: int = 0) -> dict[str, Any]:
    """A paged FP8 batch of `rows` requests with contexts uniform in [lo, hi]."""
    b = bd.paged_batch(rows, hi, True)
    g = torch.Generator(device="cpu").manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (rows,), generator=g, dtype=torch.int32)
    b["md"].seq_lens.copy_(lens.to(b["md"].seq_lens.device))
    b["kv_bytes"] = 2 * int(lens.sum()) * bd.HKV * bd.D * b["cache"].element_size()
    return b


def cell(name: str, b: dict[str, Any], bound: int, copy_bw: float) -> dict[str, Any]:
    runs = {"default": bd.NEW} | {v: bd.NEW | {da.CONFIG_ENV: v} for v in VARIANTS}
    row: dict[str, Any] = {"cell": name, "bound": bound, "kv_MB": b["kv_bytes"] / 1e6}
    ref = None
    for run, values in runs.items():
        r = bd.timed([b], values, bound)
        out = r.pop("out").float()
        ref = out if ref is None else ref
        row[run] = {
            "us": r["us"],
            "pct": 100 * bd._frac(r, b["kv_bytes"], copy_bw),
            "splits": r["splits"],
            "max_diff_vs_default": (out - ref).abs().max().item(),
        }
    parts = " ".join(f"{n} {row[n]['pct']:.1f}% ({row[n]['us']:.0f} us)" for n in runs)
    print(f"{name:>22s} bound {bound:5d}: {parts}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_decode_w2.json")
    args = ap.parse_args()
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e12:.2f} TB/s", flush=True)
    results = []
    for rows in (880, 896, 1024):
        b = bd.paged_batch(rows, CONTEXT, True)
        for bound in (CONTEXT, BOUND):
            results.append(cell(f"{rows} x {CONTEXT}", b, bound, copy_bw))
        del b
        torch.cuda.empty_cache()
    b = spread_batch(880, 1000, 2000)
    results.append(cell("880 x 1000..2000", b, BOUND, copy_bw))
    with open(args.out, "w") as f:
        json.dump({"copy_bw": copy_bw, "cells": results}, f, indent=1)


if __name__ == "__main__":
    main()
