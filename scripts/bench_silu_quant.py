"""The FP8 down_proj's input kernel, cuda.fp8_fused.silu_mul_quant, alone: us per call and
GB/s of its DRAM bytes (read gate_up, 4 I bytes a row; write hq and the scale, I + 4).

Times the public entry point only, so the same script measures an older kernel when
PYTHONPATH points at an older checkout (the same-call baseline):

    PYTHONPATH=. python scripts/bench_silu_quant.py --output-json new.json
    PYTHONPATH=/path/to/old python /path/to/new/scripts/bench_silu_quant.py --output-json old.json
    PYTHONPATH=. python scripts/bench_silu_quant.py --device cpu   # a dry run, tiny shapes

CUDA events, L2 flushed before each call, the median after warm-up (headrace.bench.gpu_timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cuda import fp8_fused

TOKENS = [1, 64, 880, 4096, 16384]
INTERS = [14336, 28672]  # Llama-3-8B, -70B
CPU_TOKENS, CPU_INTERS = [1, 3], [64, 256]


def time_call(x: torch.Tensor, iters: int) -> float:
    if x.is_cuda:
        from headrace.bench import gpu_timing

        return gpu_timing.time_op(lambda: fp8_fused.silu_mul_quant(x), iters, warmup=5)
    fp8_fused.silu_mul_quant(x)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fp8_fused.silu_mul_quant(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tokens", type=int, nargs="+")
    ap.add_argument("--inter", type=int, nargs="+")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--output-json")
    args = ap.parse_args()
    cpu = args.device == "cpu"
    tokens = args.tokens or (CPU_TOKENS if cpu else TOKENS)
    inters = args.inter or (CPU_INTERS if cpu else INTERS)
    rows = []
    print(f"{'T':>6} {'I':>6} {'us':>9} {'GB/s':>7}")
    for inter in inters:
        for t in tokens:
            x = torch.randn(t, 2 * inter, device=args.device).to(torch.bfloat16)
            sec = time_call(x, args.iters)
            nbytes = t * (4 * inter + inter + 4)
            row = {"tokens": t, "inter": inter, "us": sec * 1e6, "gb_s": nbytes / sec / 1e9}
            rows.append(row)
            print(f"{t:>6} {inter:>6} {row['us']:>9.1f} {row['gb_s']:>7.0f}", flush=True)
            del x
    if args.output_json:
        meta = {"device": torch.cuda.get_device_name() if not cpu else "cpu", "dtype": "bf16"}
        with open(args.output_json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
