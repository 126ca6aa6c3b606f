"""Micro-benchmark of the attention kernels at the Llama-3-8B shape (32 q heads, 8 KV heads,
head_dim 128, bf16, block_size 16, shuffled pages).

Decode: first scripts/bench_decode.py's table (old and new kernels side by side at issue 11's
cells, bf16 and FP8 KV, the new kernel's variants, batch 1 at contexts 128 / 256 / 1k in a
graph with a 128k bound); then the default kernel at batch 1/8/64 x contexts 1k/4k/16k (and
batch 1 at 128 / 256); achieved bandwidth = KV bytes read / kernel time, against the device
copy bandwidth (2 GiB device-to-device copy, bytes read + written).
Prefill: TFLOP/s (causal: 2 * L_q * L_kv_visible * D * Hq * 2) of the old prefill kernel
and the prefill kernel (round 2 in its default configuration) against torch SDPA (flash) on
the same shapes (scripts/bench_prefill.py). Times are medians of CUDA-event timings with L2 flushed before each run.

    PYTHONPATH=. python scripts/bench_kernels.py --out bench_kernels.json [--parts prefill]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from cuda.kv_write import write_kv
from cuda.paged_attention import AttentionMetadata, AttentionParams, paged_attention
from cuda.paged_attention_kernels import decode_splits
from headrace.bench.gpu_timing import copy_bandwidth, graphed, time_op

HQ, HKV, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16


PARAMS = AttentionParams(D**-0.5)


def paged_batch(
    batch: int, q_len: int, ctx: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    nblk = (ctx + BS - 1) // BS
    num_blocks = batch * nblk
    cache = torch.randn(2, num_blocks, BS, HKV, D, dtype=DTYPE, device="cuda")
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, nblk)
    q = torch.randn(batch * q_len, HQ, D, dtype=DTYPE, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * q_len
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    slots = torch.empty(0, dtype=torch.int64, device="cuda")  # attention only: no KV write
    return q, cache, AttentionMetadata(qsl, seq_lens, tables, slots, q_len, ctx)


def _sibling(name: str):  # type: ignore[no-untyped-def]
    """scripts/<name>.py by path: `headrace bench kernels` loads this file from elsewhere,
    so scripts/ is not on sys.path then."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SWEEP = [(1, 128), (1, 256)] + [(b, c) for b in (1, 8, 64) for c in (1024, 4096, 16384)]


def bench_decode(results: list[dict], copy_bw: float) -> None:
    _sibling("bench_decode").bench_decode(results, copy_bw)
    for batch, ctx in SWEEP:
        q, cache, md = paged_batch(batch, 1, ctx)
        out = torch.empty_like(q)

        def run(q=q, cache=cache, md=md, out=out) -> None:
            paged_attention(q, cache, md, PARAMS, out)

        t = time_op(graphed(run))

        # graph-style bound on seq_len: a 128k-token context
        def run_bound(q=q, cache=cache, md=replace(md, max_seq_len=131072), out=out) -> None:
            paged_attention(q, cache, md, PARAMS, out)

        t_bound = time_op(graphed(run_bound))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(100):
            run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 100
        kv_bytes = 2 * batch * ctx * HKV * D * cache.element_size()
        splits = decode_splits(DTYPE, D, batch, HQ, HKV, ctx, q.device)
        results.append(
            {
                "kind": "decode_sweep",  # the default kernel
                "batch": batch,
                "ctx": ctx,
                "splits": splits,
                "us": t * 1e6,  # CUDA-graph replay, L2 flushed
                "us_bound_128k": t_bound * 1e6,
                "eager_us_per_call": wall * 1e6,
                "kv_GBps": kv_bytes / t / 1e9,
                "frac_of_copy_bw": kv_bytes / t / copy_bw,
            }
        )
        print(
            f"decode B={batch:3d} ctx={ctx:6d} splits={splits:2d} {t * 1e6:8.1f} us "
            f"{kv_bytes / t / 1e9:7.0f} GB/s ({kv_bytes / t / copy_bw:5.1%} of copy) "
            f"[bound 128k: {t_bound * 1e6:7.1f} us] eager {wall * 1e6:6.1f} us/call",
            flush=True,
        )
        del q, cache, md, out


def bench_prefill(results: list[dict]) -> None:
    """Old kernel, round 2's default configuration and torch SDPA flash, side by side:
    scripts/bench_prefill.py."""
    _sibling("bench_prefill").bench_prefill(results)


def bench_write_kv(results: list[dict], copy_bw: float) -> None:
    for tokens in (64, 8192):
        cache = torch.randn(2, 4096, BS, HKV, D, dtype=DTYPE, device="cuda")
        k = torch.randn(tokens, HKV, D, dtype=DTYPE, device="cuda")
        v = torch.randn_like(k)
        slots = torch.randperm(4096 * BS, device="cuda")[:tokens]

        def run(k=k, v=v, cache=cache, slots=slots) -> None:
            write_kv(k, v, cache, slots)

        t = time_op(run)
        moved = 4 * k.numel() * k.element_size()  # read k, v; write both
        results.append(
            {"kind": "write_kv", "tokens": tokens, "us": t * 1e6, "GBps": moved / t / 1e9}
        )
        print(f"write_kv T={tokens:5d} {t * 1e6:7.1f} us {moved / t / 1e9:6.0f} GB/s", flush=True)


def profile_launch() -> None:
    """Where the host time of one eager decode call goes (cProfile, top entries)."""
    import cProfile
    import pstats

    q, cache, md = paged_batch(8, 1, 1024)
    out = torch.empty_like(q)

    def run() -> None:
        paged_attention(q, cache, md, PARAMS, out)

    run()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        run()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


PARTS = ("decode", "prefill", "write_kv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_kernels.json")
    ap.add_argument("--profile-launch", action="store_true", help="cProfile eager launches")
    ap.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which benchmarks to run"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.profile_launch:
        profile_launch()
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    results: list[dict] = []
    if "decode" in args.parts:
        bench_decode(results, copy_bw)
    if "prefill" in args.parts:
        bench_prefill(results)
    if "write_kv" in args.parts:
        bench_write_kv(results, copy_bw)
    with open(args.out, "w") as f:
        json.dump(
            {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "copy_bw_Bps": copy_bw,
                "results": results,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
