"""Prefill attention, side by side: the old kernel (cuda/paged_attention_kernels.py), the
prefill kernel (round 2, cuda/prefill_v2.py, the one `attention_cuda` runs) in its default
configuration, and torch SDPA (flash), at the Llama-3-8B shape (32 q heads, 8 KV heads,
head_dim 128, block_size 16, shuffled pages).

TFLOP/s count only the visible (query, key) pairs: 4 * pairs * head_dim * q_heads.
Times are medians of CUDA-event timings with L2 flushed before each run. Also printed: the
largest difference between the default kernel's output and the old kernel's.

    PYTHONPATH=. python scripts/bench_prefill.py --out bench_prefill.json
(scripts/bench_kernels.py runs the same as its prefill part.)

--alternate N: the default kernel and SDPA flash timed in turn N times on each causal shape,
bf16 and fp16; one line a shape with the median ratio and its range (single timings of the
~0.5 ms 4 x 2k shape moved by 10% between calls).

--round2 (gpu_bench's prefill3 step): bf16, every round-2 configuration (cuda/prefill_v2.py)
against each other, the old kernel and SDPA; then an FP8 KV cache: the old kernel
(HEADRACE_PREFILL_FP8=old) against round 2's configurations. One line a shape.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cuda import prefill_v2 as v2
from cuda.kv_write import quantize_kv
from cuda.paged_attention import AttentionMetadata, AttentionParams
from cuda.paged_attention_kernels import paged_attention_cuda
from headrace.bench import gpu_timing

HQ, HKV, D, BS = 32, 8, 128, 16
# (batch, q_len, ctx): causal whole prompts, then a chunked-prefill batch (no SDPA twin)
SHAPES = ((1, 2048, 2048), (1, 4096, 4096), (1, 8192, 8192), (1, 16384, 16384), (4, 2048, 2048))
CHUNKED = ((8, 512, 4096),)


Runner = Callable[
    [torch.Tensor, torch.Tensor, AttentionMetadata, AttentionParams, torch.Tensor], object
]


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


def default_runners() -> dict[str, Runner]:
    """name -> kernel call: the old kernel and round 2's default (the kernel `attention_cuda`
    runs)."""
    return {
        "old": paged_attention_cuda,
        v2.DEFAULT_CONFIG.name: functools.partial(v2.prefill_v2_cuda, config=v2.DEFAULT_CONFIG),
    }


def one_shape(batch: int, q_len: int, ctx: int, dtype: torch.dtype, sdpa: bool) -> dict:
    q, cache, md = paged_batch(batch, q_len, ctx, dtype)
    params = AttentionParams(D**-0.5)
    pairs = batch * sum(ctx - q_len + i + 1 for i in range(q_len))
    flops = 4 * pairs * D * HQ
    outs: dict[str, torch.Tensor] = {}
    tflops: dict[str, float | None] = {}
    for name, fn in default_runners().items():
        out = outs.setdefault(name, torch.empty_like(q))

        def run(fn: Runner = fn, out: torch.Tensor = out) -> None:
            fn(q, cache, md, params, out)

        tflops[name] = flops / time_op(run) / 1e12
    ts = sdpa_time(batch, q_len, dtype) if sdpa else None
    tflops["sdpa_flash"] = flops / ts / 1e12 if ts else None
    diff = (outs[v2.DEFAULT_CONFIG.name].float() - outs["old"].float()).abs().max().item()
    return {
        "kind": "prefill",
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "q_len": q_len,
        "ctx": ctx,
        "TFLOPs": tflops,
        "max_abs_new_minus_old": diff,
    }


def show(row: dict) -> str:
    t = row["TFLOPs"]
    cells = " | ".join(f"{k} {v:6.1f}" if v else f"{k}    n/a" for k, v in t.items())
    name = v2.DEFAULT_CONFIG.name
    ratio = f"default ({name}) / sdpa {t[name] / t['sdpa_flash']:.2f}x" if t["sdpa_flash"] else ""
    return (
        f"prefill {row['dtype']:8s} B={row['batch']} q={row['q_len']:5d} ctx={row['ctx']:5d} "
        f"TFLOP/s: {cells} | {ratio} | max|default-old| {row['max_abs_new_minus_old']:.2g}"
    )


def bench_prefill(results: list[dict]) -> None:
    for dtype in (torch.bfloat16, torch.float16):
        for batch, q_len, ctx in SHAPES + CHUNKED:
            row = one_shape(batch, q_len, ctx, dtype, sdpa=q_len == ctx)
            results.append(row)
            print(show(row), flush=True)
            torch.cuda.empty_cache()


FP8_SCALE = 0.5  # k_scale = v_scale of the FP8 rows (randn / 0.5 stays well inside e4m3)


def round2_runners() -> dict[str, Runner]:
    """name -> kernel call: the old kernel, then each of round 2's configurations (both KV
    types)."""
    runners: dict[str, Runner] = {"old": paged_attention_cuda}
    for c2 in v2.CONFIGS:
        runners[c2.name] = functools.partial(v2.prefill_v2_cuda, config=c2)
    return runners


def round2_shape(batch: int, q_len: int, ctx: int, fp8: bool) -> dict:
    """TFLOP/s of each runner on one shape; max|x - first runner| over the others."""
    q, cache, md = paged_batch(batch, q_len, ctx, torch.bfloat16)
    params = AttentionParams(D**-0.5)
    if fp8:
        cache = torch.stack([quantize_kv(cache[0], FP8_SCALE), quantize_kv(cache[1], FP8_SCALE)])
        params = AttentionParams(D**-0.5, k_scale=FP8_SCALE, v_scale=FP8_SCALE)
    pairs = batch * sum(ctx - q_len + i + 1 for i in range(q_len))
    flops = 4 * pairs * D * HQ
    tflops: dict[str, float | None] = {}
    outs: dict[str, torch.Tensor] = {}
    for name, fn in round2_runners().items():
        out = outs.setdefault(name, torch.empty_like(q))

        def run(fn: Runner = fn, out: torch.Tensor = out) -> None:
            fn(q, cache, md, params, out)

        tflops[name] = flops / time_op(run) / 1e12
    if not fp8:
        ts = sdpa_time(batch, q_len, torch.bfloat16) if q_len == ctx else None
        tflops["sdpa_flash"] = flops / ts / 1e12 if ts else None
    first = next(iter(outs.values())).float()
    diff = max((o.float() - first).abs().max().item() for o in outs.values())
    kv = "fp8" if fp8 else "bf16"
    return {
        "kind": "prefill_round2",
        "kv": kv,
        "batch": batch,
        "q_len": q_len,
        "ctx": ctx,
        "TFLOPs": tflops,
        "max_abs_diff_to_first": diff,
    }


def show_round2(row: dict) -> str:
    t = row["TFLOPs"]
    cells = " | ".join(f"{k} {v:6.1f}" if v else f"{k}    n/a" for k, v in t.items())
    timed = {k: v for k, v in t.items() if k in v2.BY_NAME and v}
    best = max(timed, key=lambda k: timed[k])
    default = t.get(v2.DEFAULT_CONFIG.name) or 0.0
    ratios = f"best {best} ({timed[best] / default:.2f}x default)" if default else f"best {best}"
    ratios += f", best / old {timed[best] / t['old']:.2f}x"
    if t.get("sdpa_flash"):
        ratios += f", best / sdpa {timed[best] / t['sdpa_flash']:.2f}x"
        ratios += f", default / sdpa {default / t['sdpa_flash']:.2f}x"
    return (
        f"prefill3 kv={row['kv']:4s} B={row['batch']} q={row['q_len']:5d} ctx={row['ctx']:5d} "
        f"TFLOP/s: {cells} | {ratios} | max|diff| {row['max_abs_diff_to_first']:.2g}"
    )


def bench_round2(results: list[dict]) -> None:
    for fp8 in (False, True):
        for batch, q_len, ctx in SHAPES + CHUNKED:
            row = round2_shape(batch, q_len, ctx, fp8)
            results.append(row)
            print(show_round2(row), flush=True)
            torch.cuda.empty_cache()


def ratio_summary(ours: list[float], sdpa: list[float]) -> dict[str, float]:
    """Per-round ratios (SDPA time / our time: > 1 means ours is faster) of alternated
    timings: their median, min and max."""
    if not ours or len(ours) != len(sdpa):
        raise ValueError("need one SDPA timing per timing of ours")
    ratios = sorted(t_sdpa / t_ours for t_ours, t_sdpa in zip(ours, sdpa, strict=True))
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}


def alternate_shape(batch: int, q_len: int, dtype: torch.dtype, rounds: int) -> dict:
    """The default kernel and SDPA flash timed in turn, `rounds` times each, on one causal
    shape: a single pair of timings of a ~0.5 ms kernel moved by 10% between calls on the
    H200 (session 8), so issue 11's ratio is read from the alternated rounds' median."""
    q, cache, md = paged_batch(batch, q_len, q_len, dtype)
    params = AttentionParams(D**-0.5)
    out = torch.empty_like(q)
    fn = default_runners()[v2.DEFAULT_CONFIG.name]
    ours, sdpa = [], []
    for _ in range(rounds):
        ours.append(time_op(lambda: fn(q, cache, md, params, out)))
        ts = sdpa_time(batch, q_len, dtype)
        if ts is None:
            raise RuntimeError("SDPA flash is not available for this shape")
        sdpa.append(ts)
    flops = 4 * batch * (q_len * (q_len + 1) // 2) * D * HQ
    return {
        "kind": "prefill_alternated",
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "q_len": q_len,
        "rounds": rounds,
        "TFLOPs_ours": [flops / t / 1e12 for t in ours],
        "TFLOPs_sdpa": [flops / t / 1e12 for t in sdpa],
        "ratio": ratio_summary(ours, sdpa),
    }


def show_alternate(row: dict) -> str:
    r = row["ratio"]
    ours, sdpa = statistics.median(row["TFLOPs_ours"]), statistics.median(row["TFLOPs_sdpa"])
    return (
        f"prefill alternated {row['dtype']:8s} B={row['batch']} q={row['q_len']:5d} "
        f"x{row['rounds']}: {v2.DEFAULT_CONFIG.name} {ours:6.1f} | sdpa_flash {sdpa:6.1f} "
        f"TFLOP/s (medians) | default / sdpa median {r['median']:.2f}x "
        f"(min {r['min']:.2f}x, max {r['max']:.2f}x)"
    )


def bench_alternated(results: list[dict], rounds: int) -> None:
    for dtype in (torch.bfloat16, torch.float16):
        for batch, q_len, ctx in SHAPES:
            if q_len != ctx:
                continue
            row = alternate_shape(batch, q_len, dtype, rounds)
            results.append(row)
            print(show_alternate(row), flush=True)
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_prefill.json")
    ap.add_argument(
        "--round2", action="store_true", help="round 2's configurations, bf16 and FP8 KV"
    )
    ap.add_argument(
        "--alternate",
        type=int,
        default=0,
        metavar="N",
        help="time the default kernel and SDPA in turn N times a causal shape (median ratio)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    results: list[dict] = []
    if args.alternate:
        bench_alternated(results, args.alternate)
    else:
        (bench_round2 if args.round2 else bench_prefill)(results)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
