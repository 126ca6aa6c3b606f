"""The row-wise FP8 GEMM with and without cuBLASLt's fast accumulation, on the Llama-3-8B
shapes at W2's decode (880 rows) and mixed-step (~16k tokens) sizes.

Per shape and M: us per call (CUDA events, L2 flushed, median) of torch._scaled_mm with
per-token x per-channel scales, use_fast_accum False then True, their TFLOP/s, and each
one's error against the fp32 product of the same dequantized operands (max |err| over the
output's rms, and the rms of the error over it), so the speed can be set against what it
costs in accuracy.

    PYTHONPATH=. python scripts/bench_fp8_accum.py --output-json out.json
    PYTHONPATH=. python scripts/bench_fp8_accum.py --device cpu   # a dry run, tiny shapes
"""

from __future__ import annotations

import argparse
import json

import torch

from cuda.fp8_quant import quantize_per_token, quantize_per_token_ref
from worker.quant.fp8 import quantize_weight_per_channel

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
MS = [880, 4096, 16384]
CPU_SHAPES, CPU_MS = {"qkv": (96, 64)}, [16]


def bench(name: str, n: int, k: int, m: int, device: str) -> dict[str, float | str | int]:
    gen = torch.Generator(device=device).manual_seed(m * 7 + n)
    w = torch.randn(n, k, device=device, generator=gen) * 0.02
    x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
    wq, ws = quantize_weight_per_channel(w)
    xq, xs = quantize_per_token(x) if device == "cuda" else quantize_per_token_ref(x, None)
    ref = (xq.float() * xs.view(-1, 1)) @ (wq.float() * ws.view(-1, 1)).t()
    rms = ref.pow(2).mean().sqrt().item()
    row: dict[str, float | str | int] = {"shape": name, "m": m, "n": n, "k": k}
    flop = 2.0 * m * n * k
    for fast in (False, True):
        tag = "fast" if fast else "exact"

        def call(fast: bool = fast) -> torch.Tensor:
            return torch._scaled_mm(
                xq,
                wq.t(),
                scale_a=xs.view(-1, 1),
                scale_b=ws.view(1, -1),
                out_dtype=torch.bfloat16,
                use_fast_accum=fast,
            )

        if device == "cuda":
            from headrace.bench import gpu_timing

            us = gpu_timing.time_op(call, 30) * 1e6
            row[f"{tag}_us"] = us
            row[f"{tag}_tflops"] = flop / us / 1e6
        err = (call().float() - ref).abs()
        row[f"{tag}_maxerr"] = err.max().item() / rms
        row[f"{tag}_rmserr"] = err.pow(2).mean().sqrt().item() / rms
    if device == "cuda":
        row["speedup"] = float(row["exact_us"]) / float(row["fast_us"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--m", type=int, nargs="+")
    ap.add_argument("--output-json")
    args = ap.parse_args()
    shapes, ms = (SHAPES, MS) if args.device == "cuda" else (CPU_SHAPES, CPU_MS)
    rows = []
    for m in args.m or ms:
        for name, (n, k) in shapes.items():
            row = bench(name, n, k, m, args.device)
            rows.append(row)
            print(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                ),
                flush=True,
            )
    if args.device == "cuda":
        for tag in ("exact", "fast"):
            for m in args.m or ms:
                tot = sum(float(r[f"{tag}_us"]) for r in rows if r["m"] == m)
                print(f"{tag}: M={m} the four GEMMs of a layer {tot:.1f} us")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
