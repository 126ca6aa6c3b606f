"""FP8 GEMV bandwidth on Llama-3-8B / 70B linear shapes, one run, L2 flushed before each
call: the new kernel (cuda/fp8_gemv.cu), the old one (HEADRACE_FP8_GEMV=old), cuBLAS bf16
on the same shape (bf16 weights: twice the bytes), and torch._scaled_mm on the FP8 weight
(M padded to 16, with the per-token activation-quantization kernel before it, as the
linear layer ran it before the GEMV). TB/s counts the weight bytes (+ scales) a call reads;
each row also gives the fraction of the device's copy bandwidth. Batches 1 and 8.

    PYTHONPATH=. python scripts/bench_fp8_gemv.py --output-json out.json
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from cuda import fp8_gemv as g
from cuda.fp8_quant import quantize_per_token
from headrace.bench import gpu_timing
from worker.quant.fp8 import quantize_weight_per_channel

SHAPES = gpu_timing.LLAMA_LINEAR_SHAPES  # name: (N, K)
timed = partial(gpu_timing.mean_time, iters=40)  # mean seconds, L2 flushed before each
copy_bandwidth = gpu_timing.copy_bandwidth


def scaled_mm(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """The pre-GEMV path: quantize x per token, pad M to 16, torch._scaled_mm row-wise."""
    m = x.shape[0]
    xp = torch.nn.functional.pad(x, (0, 0, 0, 16 - m)) if m < 16 else x
    xq, xs = quantize_per_token(xp)
    y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16)
    return y[:m]


def bench_shape(name: str, n: int, k: int, m: int, bw: float) -> dict[str, object]:
    wq, ws = quantize_weight_per_channel(torch.randn(n, k, device="cuda") * 0.05)
    wb = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    fp8_bytes = n * k + n * 4
    row: dict[str, object] = dict(shape=name, m=m, n=n, k=k)
    runs = {
        "new": (lambda: g.fp8_gemv(x, wq, ws, None, out=y, mode="new"), fp8_bytes),
        "cublas_bf16": (lambda: torch.nn.functional.linear(x, wb), 2 * n * k),
        "scaled_mm": (lambda: scaled_mm(x, wq, ws), fp8_bytes),
    }
    if m <= g.MAX_ROWS["old"]:
        runs["old"] = (lambda: g.fp8_gemv(x, wq, ws, None, out=y, mode="old"), fp8_bytes)
    for label, (fn, nbytes) in runs.items():
        t = timed(fn)
        row[f"{label}_us"] = round(t * 1e6, 2)
        row[f"{label}_TBps"] = round(nbytes / t / 1e12, 3)
        row[f"{label}_of_copy"] = round(nbytes / t / bw, 3)
    new = g.fp8_gemv(x, wq, ws, None, mode="new").float()
    want = g.fp8_gemv_ref(x, wq, ws, None).float()
    row["new_max_rel_err"] = float((new - want).abs().max() / want.abs().max())
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--output-json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
    head = f"{'shape':12s} {'M':>2s} | {'new':>15s} | {'old':>15s} | {'cuBLAS bf16':>15s}"
    print(head + f" | {'_scaled_mm':>15s}   (us, TB/s)")
    rows = []
    for m in args.batches:
        for name, (n, k) in SHAPES.items():
            r = bench_shape(name, n, k, m, bw)
            rows.append(r)
            cells = []
            for label in ("new", "old", "cublas_bf16", "scaled_mm"):
                us = r.get(f"{label}_us")
                cells.append(f"{us:7.1f} {r[f'{label}_TBps']:5.2f}TB" if us else f"{'-':>15s}")
            print(f"{name:12s} {m:2d} | " + " | ".join(cells))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(copy_bandwidth=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
