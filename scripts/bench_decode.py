"""Decode attention micro-benchmark (issue 11), old and new side by side, Llama-3-8B heads
(32 q / 8 KV heads, head_dim 128, block 16, shuffled pages), CUDA-graph replays with L2
flushed before each (medians of CUDA-event timings):

- the target cells (batch 64 x 1k / 4k / 16k, batch 8 x 16k), bf16 KV: the old CUDA-core
  kernels (HEADRACE_DECODE_KERNEL=old), the tensor-core kernel's default variant, and each
  HEADRACE_DECODE_CONFIG variant; KV bytes read / time as a fraction of the copy bandwidth;
- the same cells with an FP8 KV cache, old vs new (bytes as stored);
- batch 1 at contexts 128 / 256 / 1k in a graph captured with a 128k seq_len bound (W1's
  decode graphs): 32 calls in one graph (a model's layers), microseconds per call, old, new
  (fused merge) and new with the merge kernel (HEADRACE_DECODE_FUSED_MERGE=0).

    PYTHONPATH=. python scripts/bench_decode.py [--out bench_decode.json] [--no-variants]

scripts/bench_kernels.py --parts decode runs this.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from cuda import decode_attention as da
from cuda.paged_attention import paged_attention
from cuda.paged_attention_kernels import decode_splits, decode_workspace_numel
from headrace.bench.gpu_timing import copy_bandwidth, graphed, time_op
from headrace.bench.kernels import decode_batch

HQ, HKV, D, BS = 32, 8, 128, 16
TARGET_CELLS = ((64, 1024), (64, 4096), (64, 16384), (8, 16384))
SHORT_CELLS = ((1, 128), (1, 256), (1, 1024))
SHORT_BOUND = 131072
LAYERS = 32  # calls per graph in the batch-1 rows
TARGET = 0.85
SHORT_TARGET_US = 4.0
OLD = {da.ENV: "old"}
NEW = {da.ENV: "new"}


@contextmanager
def env(values: dict[str, str]) -> Iterator[None]:
    """The decode kernel's environment variables set to `values` (the others unset)."""
    names = (da.ENV, da.CONFIG_ENV, da.FUSED_MERGE_ENV, da.PLAN_ENV, da.FP8_MATH_ENV)
    saved = {n: os.environ.get(n) for n in names}
    try:
        for n in names:
            os.environ.pop(n, None)
        os.environ.update(values)
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


paged_batch = decode_batch  # one decode step's paged batch (headrace/bench/kernels.py)


def timed(batches: list[dict[str, Any]], values: dict[str, str], bound: int) -> dict:
    """Microseconds per call of one graph calling decode once on each batch (a model's
    layers: their own caches), under `values`, with the seq_len bound `bound`; the first
    batch's output (NaN-poisoned before)."""
    b0 = batches[0]
    batch = b0["q"].shape[0]
    mds = [replace(b["md"], max_seq_len=bound) for b in batches]
    outs = [torch.full_like(b["q"], float("nan")) for b in batches]
    numel = decode_workspace_numel(batch, HQ, D, da.MAX_SPLITS)
    workspace = torch.empty(numel, dtype=torch.float32, device="cuda")
    with env(values):
        try:

            def run() -> None:
                for b, md, out in zip(batches, mds, outs, strict=True):
                    paged_attention(b["q"], b["cache"], md, b["params"], out, workspace)

            t = time_op(graphed(run)) / len(batches)
            kv_dtype = b0["cache"].dtype if b0["cache"].element_size() == 1 else None
            args = (torch.bfloat16, D, batch, HQ, HKV, bound, b0["q"].device, kv_dtype, BS)
            splits = decode_splits(*args)
        except Exception as exc:  # one variant failing leaves the others' numbers
            print(f"  {values} failed: {exc!r}", flush=True)
            return {"us": float("nan"), "error": repr(exc), "out": outs[0], "splits": 0}
    return {"us": t * 1e6, "out": outs[0], "splits": splits}


def _frac(r: dict, kv_bytes: int, copy_bw: float) -> float:
    return kv_bytes / (r["us"] * 1e-6) / copy_bw


def target_cell(batch: int, ctx: int, fp8: bool, variants: bool, copy_bw: float) -> dict:
    b = paged_batch(batch, ctx, fp8)
    runs = {"old": timed([b], OLD, ctx), "new": timed([b], NEW, ctx)}
    if variants and not fp8:
        for cfg in da.CONFIGS:
            runs[cfg] = timed([b], NEW | {da.CONFIG_ENV: cfg}, ctx)
    diff = (runs["old"]["out"].float() - runs["new"]["out"].float()).abs().max().item()
    row: dict[str, Any] = {
        "kind": "decode",
        "batch": batch,
        "ctx": ctx,
        "kv": "fp8" if fp8 else "bf16",
        "kv_MB": b["kv_bytes"] / 1e6,
        "max_abs_diff_old_new": diff,
    }
    for name, r in runs.items():
        row[name] = {
            "us": r["us"],
            "frac_of_copy_bw": _frac(r, b["kv_bytes"], copy_bw),
            "splits": r["splits"],
        } | ({"error": r["error"]} if "error" in r else {})
    old, new = row["old"], row["new"]
    met = "yes" if new["frac_of_copy_bw"] >= TARGET else "NO"
    line = (
        f"decode {row['kv']:4s} B={batch:3d} ctx={ctx:6d} | old {old['us']:8.1f} us "
        f"{old['frac_of_copy_bw']:6.1%} | new {new['us']:8.1f} us "
        f"{new['frac_of_copy_bw']:6.1%} (splits {new['splits']:2d}) >= {TARGET:.0%}: {met}"
    )
    if len(runs) > 2:
        line += " | " + " ".join(f"{c} {row[c]['frac_of_copy_bw']:.1%}" for c in da.CONFIGS)
    print(line + f" | max|old-new| {diff:.1e}", flush=True)
    del b
    torch.cuda.empty_cache()
    return row


def short_cell(batch: int, ctx: int) -> dict:
    """Batch-1 decode in a graph of LAYERS calls (each its own cache) with a 128k bound."""
    bs = [paged_batch(batch, ctx, False) for _ in range(LAYERS)]
    runs = {
        "old": timed(bs, OLD, SHORT_BOUND),
        "new": timed(bs, NEW, SHORT_BOUND),
        "new_merge_kernel": timed(bs, NEW | {da.FUSED_MERGE_ENV: "0"}, SHORT_BOUND),
        "new_own_bound": timed(bs, NEW, ctx),
    }
    row: dict[str, Any] = {
        "kind": "decode_short",
        "batch": batch,
        "ctx": ctx,
        "bound": SHORT_BOUND,
        "calls_per_graph": LAYERS,
    }
    row |= {k: {"us": r["us"], "splits": r["splits"]} for k, r in runs.items()}
    met = "yes" if runs["new"]["us"] <= SHORT_TARGET_US else "NO"
    print(
        f"decode bf16 B={batch:3d} ctx={ctx:6d} bound {SHORT_BOUND} ({LAYERS} calls a graph): "
        f"old {runs['old']['us']:6.2f} us | new {runs['new']['us']:6.2f} us "
        f"(grid {runs['new']['splits']} splits) <= {SHORT_TARGET_US} us: {met} | new + merge "
        f"kernel {runs['new_merge_kernel']['us']:6.2f} us | new, bound = ctx "
        f"{runs['new_own_bound']['us']:6.2f} us",
        flush=True,
    )
    return row


def bench_decode(results: list[dict], copy_bw: float, variants: bool = True) -> None:
    for batch, ctx in SHORT_CELLS:
        results.append(short_cell(batch, ctx))
    for fp8 in (False, True):
        for batch, ctx in TARGET_CELLS:
            results.append(target_cell(batch, ctx, fp8, variants, copy_bw))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_decode.json")
    ap.add_argument("--no-variants", action="store_true", help="default variant only")
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    results: list[dict] = []
    bench_decode(results, copy_bw, not args.no_variants)
    with open(args.out, "w") as f:
        json.dump(
            {"device": torch.cuda.get_device_name(), "copy_bw_Bps": copy_bw, "results": results},
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
