"""`headrace bench kernels`: issue 11's attention-kernel table in one run (GPU only).

Decode: the old CUDA-core kernels (HEADRACE_DECODE_KERNEL=old) and the tensor-core one
(new) side by side at batch 64 x 1k / 4k / 16k and batch 8 x 16k context, Llama-3-8B heads
(32 q / 8 KV, head_dim 128), bf16, block 16, shuffled pages: KV bytes read / kernel time
as a fraction of the device copy bandwidth measured in the same run (1 GiB copy, bytes read
+ written), CUDA-graph replays with L2 flushed before each (medians). `--fp8` adds the same
cells with an FP8 KV cache (bytes as stored).
Prefill: scripts/bench_kernels.py's prefill rows (our kernel against torch's flash SDPA).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
from pathlib import Path
from typing import Any

from headrace.bench.gpu_timing import copy_bandwidth, graphed, time_op

HQ, HKV, D, BS = 32, 8, 128, 16
CELLS = ((64, 1024), (64, 4096), (64, 16384), (8, 16384))
TARGET = 0.85
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-json", default="bench_kernels.json", help="results file")
    p.add_argument("--iters", type=int, default=20, help="timed replays per cell (median)")
    p.add_argument("--fp8", action="store_true", help="also FP8 KV cache cells")
    p.add_argument("--no-prefill", action="store_true", help="decode rows only")


def decode_batch(batch: int, ctx: int, fp8: bool) -> dict[str, Any]:
    """One decode step's paged batch at the Llama-3-8B heads: shuffled pages of bf16 (or
    FP8, scale 1) KV, `ctx` tokens per request; also the KV bytes a kernel reads."""
    import torch

    from cuda.kv_write import quantize_kv
    from cuda.paged_attention import AttentionMetadata, AttentionParams

    nblk = (ctx + BS - 1) // BS
    num_blocks = batch * nblk
    cache = torch.randn(2, num_blocks, BS, HKV, D, dtype=torch.bfloat16, device="cuda")
    params = AttentionParams(D**-0.5)
    if fp8:
        cache = quantize_kv(cache, 1.0)
        params = AttentionParams(D**-0.5, k_scale=1.0, v_scale=1.0)
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, nblk)
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    slots = torch.empty(0, dtype=torch.int64, device="cuda")
    md = AttentionMetadata(qsl, seq_lens, tables, slots, 1, ctx)
    kv_bytes = 2 * batch * ctx * HKV * D * cache.element_size()
    return {"q": q, "cache": cache, "md": md, "params": params, "kv_bytes": kv_bytes}


def decode_cell(batch: int, ctx: int, fp8: bool, iters: int, copy_bw: float) -> dict[str, Any]:
    """Old and new decode kernels on one paged batch."""
    import torch

    from cuda import decode_attention as da
    from cuda.paged_attention import paged_attention
    from cuda.paged_attention_kernels import decode_splits

    b = decode_batch(batch, ctx, fp8)
    q, cache, md, params, kv_bytes = b["q"], b["cache"], b["md"], b["params"], b["kv_bytes"]
    row: dict[str, Any] = {"batch": batch, "ctx": ctx, "kv": "fp8" if fp8 else "bf16"}
    outs = {}
    saved = os.environ.get(da.ENV)
    try:
        for which in ("old", "new"):
            os.environ[da.ENV] = which
            out = torch.full_like(q, float("nan"))

            def run(out: torch.Tensor = out) -> None:
                paged_attention(q, cache, md, params, out)

            try:  # one kernel failing leaves the other's numbers
                t = time_op(graphed(run), iters)
            except Exception as exc:
                print(f"decode {which} B={batch} ctx={ctx} failed: {exc!r}", flush=True)
                row[which] = {"us": float("nan"), "frac_of_copy_bw": float("nan"), "splits": 0}
                row[which]["error"] = repr(exc)
                outs[which] = out
                continue
            kv_dtype = cache.dtype if fp8 else None
            splits = decode_splits(torch.bfloat16, D, batch, HQ, HKV, ctx, q.device, kv_dtype, BS)
            row[which] = {"us": t * 1e6, "frac_of_copy_bw": kv_bytes / t / copy_bw}
            row[which]["splits"] = splits
            outs[which] = out
    finally:
        if saved is None:
            os.environ.pop(da.ENV, None)
        else:
            os.environ[da.ENV] = saved
    row["max_abs_diff_old_new"] = (outs["old"].float() - outs["new"].float()).abs().max().item()
    row["kv_MB"] = kv_bytes / 1e6
    return row


def _print_decode(row: dict[str, Any]) -> None:
    old, new = row["old"], row["new"]
    met = "yes" if new["frac_of_copy_bw"] >= TARGET else "NO"
    print(
        f"decode {row['kv']:4s} B={row['batch']:3d} ctx={row['ctx']:6d} {row['kv_MB']:7.0f} MB | "
        f"old {old['us']:8.1f} us {old['frac_of_copy_bw']:6.1%} (splits {old['splits']:2d}) | "
        f"new {new['us']:8.1f} us {new['frac_of_copy_bw']:6.1%} (splits {new['splits']:2d}) | "
        f">= {TARGET:.0%}: {met} | max |old-new| {row['max_abs_diff_old_new']:.2e}",
        flush=True,
    )


def prefill_rows(results: list[dict[str, Any]], copy_bw: float) -> None:
    """scripts/bench_kernels.py's prefill part, whatever it holds now (its function takes
    the results list, and the copy bandwidth if it asks for it)."""
    spec = importlib.util.spec_from_file_location("headrace_bench_kernels_script", SCRIPT)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{SCRIPT} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = module.bench_prefill
    extra = [copy_bw] if len(inspect.signature(fn).parameters) > 1 else []
    fn(results, *extra)


def kernels_main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("bench kernels needs a CUDA GPU")
    if args.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {args.iters}")
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    name = torch.cuda.get_device_name()
    print(f"{name}: device copy bandwidth {copy_bw / 1e12:.2f} TB/s", flush=True)
    decode = []
    for fp8 in (False, True) if args.fp8 else (False,):
        for batch, ctx in CELLS:
            row = decode_cell(batch, ctx, fp8, args.iters, copy_bw)
            _print_decode(row)
            decode.append(row)
            torch.cuda.empty_cache()
    prefill: list[dict[str, Any]] = []
    if not args.no_prefill:
        try:
            prefill_rows(prefill, copy_bw)
        except Exception as exc:  # the decode table stands on its own
            print(f"prefill rows failed: {exc!r}", flush=True)
            prefill.append({"error": repr(exc)})
    report = {"device": name, "torch": torch.__version__, "copy_bw_Bps": copy_bw}
    report |= {"target_frac": TARGET, "decode": decode, "prefill": prefill}
    with open(args.output_json, "w") as f:
        json.dump(report, f, indent=1)
    return 0
