"""The FP8 q/k/v and gate/up input: add + RMSNorm then the per-token FP8 quantization
(cuda.fused_ops.add_rms_norm + cuda.fp8_quant.quantize_per_token, two launches: today's
path) against cuda.norm_quant.add_rms_norm_quant (one launch), us per call.

Public entry points only, each call in a CUDA graph (kernel time, not Python's launch
cost), timed with L2 flushed before each replay and with it warm (in a decode step the
rows come from the GEMM just before, partly from L2). GB/s is the fused kernel's bytes
(x, residual in; out, residual, xq, scales out: 9 H + 4 a row) over its flushed time.
Each shape also checks the two paths agree byte for byte.

    PYTHONPATH=. python scripts/bench_norm_quant.py --output-json norm_quant.json
    PYTHONPATH=. python scripts/bench_norm_quant.py --device cpu   # a dry run, tiny shapes
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable

import torch

from cuda import norm_quant
from cuda.fp8_quant import quantize_per_token
from cuda.fused_ops import add_rms_norm

TOKENS = [1, 64, 880, 8192, 16384]
HIDDEN = [4096, 8192]  # Llama-3-8B, -70B
CPU_TOKENS, CPU_HIDDEN = [1, 9], [64]
EPS = 1e-5


def unfused(x: torch.Tensor, res: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out, new_res = add_rms_norm(x, res, w, EPS)
    return (out, new_res, *quantize_per_token(out))


def fused(x: torch.Tensor, res: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return norm_quant.add_rms_norm_quant(x, res, w, EPS)


def _bytes_equal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(
        torch.equal(p.view(torch.uint8), q.view(torch.uint8)) for p, q in zip(a, b, strict=True)
    )


def time_graphed(fn: Callable[[], object], iters: int, flush_mb: int) -> float:
    from headrace.bench import gpu_timing

    return gpu_timing.time_op(gpu_timing.graphed(fn), iters, flush_mb=flush_mb, warmup=5)


def time_cpu(fn: Callable[[], object]) -> float:
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(t: int, h: int, device: str, iters: int) -> dict:
    """One shape: us per call of both paths (flushed, warm), fused GB/s, byte equality."""
    x = torch.randn(t, h, device=device).to(torch.bfloat16)
    res = torch.randn(t, h, device=device).to(torch.bfloat16)
    w = (torch.rand(h, device=device) + 0.5).to(torch.bfloat16)
    row: dict = {"tokens": t, "hidden": h}
    row["same"] = _bytes_equal(fused(x, res, w), unfused(x, res, w))
    for name, fn in (("unfused", unfused), ("fused", fused)):
        call = functools.partial(fn, x, res, w)
        if device == "cpu":
            row[name] = row[f"{name}_warm"] = time_cpu(call) * 1e6
        else:
            row[name] = time_graphed(call, iters, 256) * 1e6
            row[f"{name}_warm"] = time_graphed(call, iters, 0) * 1e6
    row["fused_gb_s"] = t * (9 * h + 4) / (row["fused"] * 1e-6) / 1e9
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tokens", type=int, nargs="+")
    ap.add_argument("--hidden", type=int, nargs="+")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--output-json")
    args = ap.parse_args()
    cpu = args.device == "cpu"
    tokens = args.tokens or (CPU_TOKENS if cpu else TOKENS)
    hidden = args.hidden or (CPU_HIDDEN if cpu else HIDDEN)
    rows = []
    print(
        f"{'T':>6} {'H':>5} {'norm+quant':>11} {'fused':>9} {'saved':>8} {'warm n+q':>9} "
        f"{'warm fused':>10} {'GB/s':>6} same"
    )
    for h in hidden:
        for t in tokens:
            row = measure(t, h, args.device, args.iters)
            rows.append(row)
            print(
                f"{t:>6} {h:>5} {row['unfused']:>9.1f}us {row['fused']:>7.1f}us "
                f"{row['unfused'] - row['fused']:>6.1f}us {row['unfused_warm']:>7.1f}us "
                f"{row['fused_warm']:>8.1f}us {row['fused_gb_s']:>6.0f} {row['same']}",
                flush=True,
            )
    if args.output_json:
        meta = {"device": "cpu" if cpu else torch.cuda.get_device_name(), "dtype": "bf16"}
        with open(args.output_json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
