"""W4A16 GEMV bandwidth and dequantize+GEMM TFLOP/s on Llama-3-8B / 70B linear shapes,
against cuBLAS bf16 on the same shapes and the device copy bandwidth (one run); each for
the rows layout (gemv_m*) and the tiles layout (gemv_tiles, tensor cores), 1 and 8 rows."""

from __future__ import annotations

import argparse
import json

import torch

from cuda import int4_gemm as ig

SHAPES = {  # name: (N, K)
    "8b.qkv": (6144, 4096),
    "8b.o": (4096, 4096),
    "8b.gate_up": (28672, 4096),
    "8b.down": (4096, 14336),
    "70b.qkv": (10240, 8192),
    "70b.gate_up": (57344, 8192),
    "70b.down": (8192, 28672),
}


def timed(fn, iters: int = 50) -> float:  # type: ignore[no-untyped-def]
    """Mean seconds per call, L2 flushed before each call (weights come from HBM)."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    total = 0.0
    for _ in range(iters):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        total += s.elapsed_time(e) / 1e3
    return total / iters


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), 10)
    return 2 * a.numel() / t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--output-json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for name, (n, k) in SHAPES.items():
        g = k // args.group_size
        w = ig.Int4Weight(
            qw=torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda"),
            scales=(torch.rand(n, g, device="cuda") * 0.01).half(),
            zeros=torch.randint(0, 16, (n, g), dtype=torch.uint8, device="cuda"),
            group_size=args.group_size,
        )
        wb = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        x1 = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        y1 = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        t_gemv = timed(lambda: ig.int4_linear(x1, w, out=y1))  # noqa: B023
        wt = w.as_tiles()  # the same weight for the tensor-core GEMV (gemv_tiles)
        t_tiles = timed(lambda: ig.int4_linear(x1, wt, out=y1))  # noqa: B023
        x8 = torch.randn(8, k, dtype=torch.bfloat16, device="cuda")
        y8 = torch.empty(8, n, dtype=torch.bfloat16, device="cuda")
        t_rows8 = timed(lambda: ig.int4_linear(x8, w, out=y8))  # noqa: B023
        t_tiles8 = timed(lambda: ig.int4_linear(x8, wt, out=y8))  # noqa: B023
        t_bf16 = timed(lambda: torch.nn.functional.linear(x1, wb))  # noqa: B023
        q_bytes = w.qw.numel() * 4 + w.scales.numel() * 2 + w.zeros.numel()
        xp = torch.randn(args.prefill_tokens, k, dtype=torch.bfloat16, device="cuda")
        scratch = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        t_pre = timed(lambda: ig.int4_linear(xp, w, scratch=scratch), 20)  # noqa: B023
        t_pre_tiles = timed(lambda: ig.int4_linear(xp, wt, scratch=scratch), 20)  # noqa: B023
        t_pre_bf16 = timed(lambda: torch.nn.functional.linear(xp, wb), 20)  # noqa: B023
        flops = 2 * args.prefill_tokens * n * k
        row = dict(
            shape=name,
            n=n,
            k=k,
            gemv_us=t_gemv * 1e6,
            gemv_tb_s=q_bytes / t_gemv / 1e12,
            gemv_frac_copy=q_bytes / t_gemv / bw,
            tiles_gemv_us=t_tiles * 1e6,
            tiles_gemv_frac_copy=q_bytes / t_tiles / bw,
            rows_m8_us=t_rows8 * 1e6,
            tiles_m8_us=t_tiles8 * 1e6,
            cublas_bf16_gemv_us=t_bf16 * 1e6,
            cublas_bf16_tb_s=n * k * 2 / t_bf16 / 1e12,
            prefill_tflops=flops / t_pre / 1e12,
            tiles_prefill_tflops=flops / t_pre_tiles / 1e12,
            cublas_bf16_prefill_tflops=flops / t_pre_bf16 / 1e12,
        )
        rows.append(row)
        print(json.dumps({k_: round(v, 3) if isinstance(v, float) else v for k_, v in row.items()}))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(copy_bandwidth=bw, group_size=args.group_size, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
