"""One FP8 linear at prefill sizes against bf16 F.linear, on the Llama-3-8B shapes.

Where a prefill-sized FP8 linear spends its time (W3 with FP8 ran slower than bf16): per
shape and M (tokens), the median of L2-flushed calls of
    bf16        F.linear(x, w_bf16)                    cuBLAS, the baseline
    fp8         Fp8Linear(x): the layer as the model runs it (quantization + GEMM)
    quant       cuda/fp8_quant.py's per-token kernel alone
    rowwise     torch._scaled_mm on quantized x, per-token x per-channel scales alone
    tensorwise  torch._scaled_mm with one scale each (cuBLASLt's plain FP8 GEMM)
and the fp8 / bf16 speedup with TFLOP/s. `silu+down` is the MLP's down projection with
the fused SiLU-quant kernel (cuda/fp8_fused.cu) against silu_and_mul + bf16 F.linear.
Then the prefill attention of one W3-sized chunk (8 prompts of 1024 tokens, 32 / 8 heads),
through the engine's entry (cuda/prefill_attention.attention_cuda): a bf16 KV cache against
an FP8 one, both on the prefill kernel (round 2, cuda/prefill_v2.py); HEADRACE_PREFILL_KERNEL
and HEADRACE_PREFILL_FP8 pick the kernels as in the engine (=old: the older kernel).

    PYTHONPATH=. python scripts/bench_fp8_linear.py --m 2048 8192 --output-json out.json
    PYTHONPATH=. python scripts/bench_fp8_linear.py --device cpu   # a dry run, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cuda.fp8_quant import quantize_per_token
from worker.quant.fp8 import Fp8Linear, quantize_weight_per_channel

SHAPES = {  # name: (N, K)
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}
CPU_SHAPES = {"qkv": (96, 64), "down": (64, 224)}  # the dry run's


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        from headrace.bench import gpu_timing

        return lambda fn: gpu_timing.time_op(fn, 20)

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return cpu_time


def make_layer(n: int, k: int, device: str) -> tuple[Fp8Linear, torch.Tensor]:
    """An Fp8Linear with a quantized random weight, and that weight in bf16."""
    w = torch.randn(n, k, device=device) * 0.02
    layer = Fp8Linear(k, n, bias=False).to(device)
    wq, ws = quantize_weight_per_channel(w)
    layer.weight.data.copy_(wq)
    layer.weight_scale.data.copy_(ws)
    return layer, w.to(torch.bfloat16)


def bench_linear(name: str, n: int, k: int, m: int, device: str) -> dict[str, float | str]:
    t = timer(device)
    layer, wb = make_layer(n, k, device)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    row: dict[str, float | str] = {"shape": name, "m": m, "n": n, "k": k}
    row["bf16_us"] = t(lambda: F.linear(x, wb)) * 1e6
    row["fp8_us"] = t(lambda: layer(x)) * 1e6
    if device == "cuda":
        xq, xs = quantize_per_token(x)
        ws = layer.weight_scale.view(1, n)
        one = torch.ones((), device=device)
        wt = layer.weight.t()
        row["quant_us"] = t(lambda: quantize_per_token(x)) * 1e6
        row["rowwise_us"] = (
            t(lambda: torch._scaled_mm(xq, wt, scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16))
            * 1e6
        )
        row["tensorwise_us"] = (
            t(lambda: torch._scaled_mm(xq, wt, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
            * 1e6
        )
    flop = 2.0 * m * n * k
    row["bf16_tflops"] = flop / float(row["bf16_us"]) / 1e6
    row["fp8_tflops"] = flop / float(row["fp8_us"]) / 1e6
    row["speedup"] = float(row["bf16_us"]) / float(row["fp8_us"])
    return row


def bench_silu_down(n: int, k: int, m: int, device: str) -> dict[str, float | str]:
    """The MLP's down projection from gate_up [m, 2k]: fused SiLU-quant + GEMM vs bf16."""
    from cuda.fused_ops import silu_and_mul

    t = timer(device)
    layer, wb = make_layer(n, k, device)
    gate_up = torch.randn(m, 2 * k, dtype=torch.bfloat16, device=device)
    bf16 = t(lambda: F.linear(silu_and_mul(gate_up), wb)) * 1e6
    fp8 = t(lambda: layer.forward_silu_mul(gate_up)) * 1e6
    return {"shape": "silu+down", "m": m, "n": n, "k": k, "bf16_us": bf16, "fp8_us": fp8,
            "speedup": bf16 / fp8}  # fmt: skip


def bench_prefill_attention(batch: int, q_len: int, device: str) -> dict[str, float | str]:
    """One prefill chunk's attention per KV dtype (us), through attention_cuda."""
    from cuda.paged_attention import AttentionMetadata, AttentionParams, paged_attention_ref
    from cuda.prefill_attention import attention_cuda, choice_from_env, fp8_choice_from_env

    hq, hkv, d, bs = (32, 8, 128, 16) if device == "cuda" else (4, 2, 16, 16)
    t = timer(device)
    nblk = -(-q_len // bs)
    gen = torch.Generator(device=device).manual_seed(0)
    cache = torch.randn(2, batch * nblk, bs, hkv, d, device=device, generator=gen)
    q = torch.randn(batch * q_len, hq, d, device=device, generator=gen).to(torch.bfloat16)
    i32 = torch.int32
    md = AttentionMetadata(
        query_start_loc=torch.arange(batch + 1, dtype=i32, device=device) * q_len,
        seq_lens=torch.full((batch,), q_len, dtype=i32, device=device),
        block_tables=torch.arange(batch * nblk, dtype=i32, device=device).view(batch, nblk),
        slot_mapping=torch.empty(0, dtype=torch.int64, device=device),
        max_query_len=q_len,
        max_seq_len=q_len,
    )
    params = AttentionParams(d**-0.5, kv_written=True)
    out = torch.empty_like(q)
    row: dict[str, float | str] = {"shape": "attention", "m": batch * q_len, "batch": batch}
    choices = (choice_from_env(), fp8_choice_from_env())  # the engine's (worker/cuda_attention.py)
    for name, kv in (("bf16", cache.to(torch.bfloat16)), ("fp8", cache.to(torch.float8_e4m3fn))):
        if device == "cuda":
            run = lambda kv=kv: attention_cuda(q, kv, md, params, out, None, *choices)  # noqa: E731
        else:
            run = lambda kv=kv: paged_attention_ref(q, kv, md, params, out)  # noqa: E731
        row[f"{name}_us"] = t(run) * 1e6
    row["speedup"] = float(row["bf16_us"]) / float(row["fp8_us"])
    return row


def fmt(r: dict[str, float | str]) -> str:
    cols = ["bf16_us", "fp8_us", "quant_us", "rowwise_us", "tensorwise_us"]
    cells = " ".join(f"{float(r[c]):9.1f}" if c in r else f"{'-':>9}" for c in cols)
    return f"{r['shape']:>9} {int(r['m']):6d} {cells} {float(r['speedup']):7.2f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", type=int, nargs=2, default=[8, 1024], metavar=("B", "Q"))
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    shapes = SHAPES if args.device == "cuda" else CPU_SHAPES
    ms = args.m if args.device == "cuda" else [16]
    print(f"{'shape':>9} {'M':>6} {'bf16':>9} {'fp8':>9} {'quant':>9} {'rowwise':>9} "
          f"{'tensorw':>9} {'fp8/bf16':>8}   (us per call, L2 flushed)")  # fmt: skip
    rows = []
    for m in ms:
        for name, (n, k) in shapes.items():
            rows.append(bench_linear(name, n, k, m, args.device))
            print(fmt(rows[-1]), flush=True)
        n, k = shapes["down"]
        rows.append(bench_silu_down(n, k, m, args.device))
        print(fmt(rows[-1]), flush=True)
    for m in ms:
        sel = [r for r in rows if r["m"] == m and r["shape"] in SHAPES]
        bf16, fp8 = (sum(float(r[c]) for r in sel) for c in ("bf16_us", "fp8_us"))
        print(f"M={m}: one layer's 4 linears bf16 {bf16:.0f} us, fp8 {fp8:.0f} us "
              f"({bf16 / fp8:.2f}x)")  # fmt: skip
    b, q = args.attention if args.device == "cuda" else (2, 32)
    rows.append(bench_prefill_attention(b, q, args.device))
    r = rows[-1]
    print(f"prefill attention {b} x {q} tokens: bf16 KV {float(r['bf16_us']):.1f} us, "
          f"fp8 KV {float(r['fp8_us']):.1f} us (bf16/fp8 {float(r['speedup']):.2f}x)")  # fmt: skip
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": args.device, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
