"""Prefill attention, side by side: the old kernel (cuda/paged_attention_kernels.py), the new
one (cuda/prefill_attention.py) in each tile configuration, and torch SDPA (flash), at the
Llama-3-8B shape (32 q heads, 8 KV heads, head_dim 128, block_size 16, shuffled pages).

TFLOP/s count only the visible (query, key) pairs: 4 * pairs * head_dim * q_heads.
Times are medians of CUDA-event timings with L2 flushed before each run. Each line ends with
`new` (the shape's `default_config`, round 2) and `r1` (round 1's default tile, m128n64w4s2)
over SDPA, side by side, and the largest difference between the new default kernel's output
and the old kernel's.

    PYTHONPATH=. python scripts/bench_prefill.py --out bench_prefill.json [--configs NAME ...]
        [--dtypes bf16] [--short]
(scripts/bench_kernels.py runs the same as its prefill part.)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cuda import prefill_attention as pa
from cuda.paged_attention import AttentionMetadata, AttentionParams
from cuda.paged_attention_kernels import paged_attention_cuda
from headrace.bench import gpu_timing

HQ, HKV, D, BS = 32, 8, 128, 16
# (batch, q_len, ctx): causal whole prompts, then a chunked-prefill batch (no SDPA twin)
SHAPES = ((1, 2048, 2048), (1, 4096, 4096), (1, 8192, 8192), (1, 16384, 16384), (4, 2048, 2048))
CHUNKED = ((8, 512, 4096),)


def time_op(fn: Callable[[], object], iters: int = 10) -> float:
    """Median seconds over iters runs, L2 flushed before each (two warm-up runs)."""
    return gpu_timing.time_op(fn, iters, warmup=2)


def paged_batch(
    batch: int, q_len: int, ctx: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    nblk = (ctx + BS - 1) // BS
    num_blocks = batch * nblk
    cache = torch.randn(2, num_blocks, BS, HKV, D, dtype=dtype, device="cuda")
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, nblk)
    q = torch.randn(batch * q_len, HQ, D, dtype=dtype, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * q_len
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    slots = torch.empty(0, dtype=torch.int64, device="cuda")  # attention only: no KV write
    return q, cache, AttentionMetadata(qsl, seq_lens, tables, slots, q_len, ctx)


def sdpa_time(batch: int, q_len: int, dtype: torch.dtype) -> float | None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, HQ, q_len, D, dtype=dtype, device="cuda")
    k = torch.randn(batch, HKV, q_len, D, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return time_op(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    except RuntimeError as exc:
        print("sdpa flash failed:", exc)
        return None


def configs_to_run(names: list[str] | None, default: pa.TileConfig) -> list[pa.TileConfig]:
    """The named configurations (all when None), always with round 1's and `default`."""
    chosen = list(pa.CONFIGS) if names is None else [pa.BY_NAME[n] for n in names]
    return [c for c in pa.CONFIGS if c in chosen or c in (pa.ROUND1_CONFIG, default)]


def one_shape(
    batch: int,
    q_len: int,
    ctx: int,
    dtype: torch.dtype,
    sdpa: bool,
    names: list[str] | None = None,
) -> dict:
    q, cache, md = paged_batch(batch, q_len, ctx, dtype)
    params = AttentionParams(D**-0.5)
    pairs = batch * sum(ctx - q_len + i + 1 for i in range(q_len))
    flops = 4 * pairs * D * HQ
    default = pa.default_config(D, q_len, HQ // HKV)
    assert default is not None
    outs = {"old": torch.empty_like(q), "new": torch.empty_like(q)}
    tflops: dict[str, float | None] = {}
    tflops["old"] = (
        flops / time_op(lambda: paged_attention_cuda(q, cache, md, params, outs["old"])) / 1e12
    )
    for c in configs_to_run(names, default):
        out = outs["new"] if c == default else torch.empty_like(q)

        def run(c: pa.TileConfig = c, out: torch.Tensor = out) -> None:
            pa.prefill_attention_cuda(q, cache, md, params, out, c)

        tflops[c.name] = flops / time_op(run) / 1e12
    ts = sdpa_time(batch, q_len, dtype) if sdpa else None
    tflops["sdpa_flash"] = flops / ts / 1e12 if ts else None
    diff = (outs["new"].float() - outs["old"].float()).abs().max().item()
    return {
        "kind": "prefill",
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "q_len": q_len,
        "ctx": ctx,
        "TFLOPs": tflops,
        "new_config": default.name,
        "max_abs_new_minus_old": diff,
    }


def ratios(row: dict) -> str:
    """`new` (the shape's default tile) and round 1's default over SDPA (over each other
    where SDPA has no twin), and the best tile over SDPA."""
    t = row["TFLOPs"]
    new, r1, sdpa = t.get(row["new_config"]), t.get(pa.ROUND1_CONFIG.name), t["sdpa_flash"]
    if not (new and r1):
        return ""
    if not sdpa:
        return f"new ({row['new_config']}) / r1 {new / r1:.2f}x"
    best = max(v for k, v in t.items() if k in pa.BY_NAME and v)
    return (
        f"new ({row['new_config']}) / sdpa {new / sdpa:.2f}x, r1 / sdpa {r1 / sdpa:.2f}x, "
        f"best / sdpa {best / sdpa:.2f}x"
    )


def summary(row: dict) -> str:
    """One short line: `new` and round 1's default against SDPA (or against each other)."""
    t = row["TFLOPs"]
    new, r1, sdpa = t.get(row["new_config"]), t.get(pa.ROUND1_CONFIG.name), t["sdpa_flash"]
    shape = f"{row['dtype']} {row['batch']}x{row['q_len']}" + (
        f" on {row['ctx']}" if row["ctx"] != row["q_len"] else ""
    )
    best = max((v, k) for k, v in t.items() if k in pa.BY_NAME and v)

    def cell(v: float | None) -> str:
        return f"{v:6.1f}" + (f" = {v / sdpa:.2f}x sdpa" if v and sdpa else "")

    return (
        f"prefill {shape}: new {row['new_config']} {cell(new)} | r1 {pa.ROUND1_CONFIG.name} "
        f"{cell(r1)} | sdpa {sdpa or 0:.1f} | best {best[1]} {best[0]:.1f} TFLOP/s"
    )


def show(row: dict) -> str:
    t = row["TFLOPs"]
    cells = " | ".join(f"{k} {v:6.1f}" if v else f"{k}    n/a" for k, v in t.items())
    return (
        f"prefill {row['dtype']:8s} B={row['batch']} q={row['q_len']:5d} ctx={row['ctx']:5d} "
        f"TFLOP/s: {cells} | {ratios(row)} | max|new-old| {row['max_abs_new_minus_old']:.2g}"
    )


def bench_prefill(
    results: list[dict],
    names: list[str] | None = None,
    dtypes: tuple[str, ...] = ("bf16", "fp16"),
    short: bool = False,
) -> None:
    for dtype in [{"bf16": torch.bfloat16, "fp16": torch.float16}[d] for d in dtypes]:
        for batch, q_len, ctx in SHAPES + CHUNKED:
            row = one_shape(batch, q_len, ctx, dtype, q_len == ctx, names)
            results.append(row)
            print(summary(row) if short else show(row), flush=True)
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_prefill.json")
    ap.add_argument(
        "--configs", nargs="+", choices=sorted(pa.BY_NAME), help="tiles to time (default all)"
    )
    ap.add_argument("--dtypes", nargs="+", choices=("bf16", "fp16"), default=["bf16", "fp16"])
    ap.add_argument("--short", action="store_true", help="one summary line per shape")
    args = ap.parse_args()
    torch.manual_seed(0)
    results: list[dict] = []
    bench_prefill(results, args.configs, tuple(args.dtypes), args.short)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
