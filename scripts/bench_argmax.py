"""The greedy decode tail: microseconds per call after the LM head, at B rows x V = 128,256
(Llama-3-8B's vocabulary), bf16 logits as the head writes them.

    v1     .float() then the old fp32 argmax kernel (the tail before this change, the
           kernel's source kept below as the same-call baseline)
    old    .float() then argmax_rows on the fp32 copy (public entry points, new kernel)
    fp32   argmax_rows alone on fp32 logits (the eager sampler's fp32 rows)
    new    argmax_rows on the 16-bit logits (the greedy graph's tail now)

CUDA events, the median of --iters calls after --warmup; GB/s counts the bytes each tail
reads and writes (the cast: 2 + 4 bytes an element; an fp32 argmax 4; a 16-bit one 2).
Every variant's ids are checked against torch.argmax first.

    PYTHONPATH=. python scripts/bench_argmax.py --output-json bench_argmax.json
    PYTHONPATH=. python scripts/bench_argmax.py --device cpu   # dry run: torch's argmax

Expected on an H200 (4.8 TB/s peak, ~3.5-4 TB/s for a read-only stream): B = 880, new ~60-70
us vs old ~450 us and v1 ~680 us (profile: cast 354 + argmax 328); B = 1, every variant
~4-6 us (launch and one load round trip).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections.abc import Callable

import numpy as np
import torch

from cuda import argmax, compiler

VOCAB = 128256
BATCHES = (1, 64, 256, 880)

V1_SOURCE = r"""
__device__ __forceinline__ unsigned int ordered(float f) {
    const unsigned int u = __float_as_uint(f == 0.0f ? 0.0f : f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
extern "C" __global__ void __launch_bounds__(256) argmax_rows_v1(
    const float* __restrict__ x, long long stride, int vocab, int per_block,
    unsigned long long* __restrict__ keys, unsigned int* __restrict__ counts,
    long long* __restrict__ out) {
    const long long row = blockIdx.y;
    const int start = blockIdx.x * per_block;
    const int end = min(start + per_block, vocab);
    const float* xr = x + row * stride;
    unsigned long long best = 0ull;
    for (int i = start + threadIdx.x; i < end; i += blockDim.x) {
        const unsigned long long key =
            ((unsigned long long)ordered(xr[i]) << 32) | (0xffffffffu - (unsigned int)i);
        best = max(best, key);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
    __shared__ unsigned long long warp_best[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) warp_best[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) best = max(best, warp_best[w]);
        atomicMax(keys + row, best);
        __threadfence();
        if (atomicAdd(counts + row, 1u) == gridDim.x - 1) {
            const unsigned long long k = atomicExch(keys + row, 0ull);
            counts[row] = 0u;
            out[row] = (long long)(0xffffffffu - (unsigned int)(k & 0xffffffffull));
        }
    }
}
"""
V1_PER_BLOCK = 1024


def v1_argmax(x: torch.Tensor) -> torch.Tensor:
    """The old kernel (fp32 rows, 4-byte loads, 1,024 elements a block)."""
    rows, vocab = x.shape
    keys, counts = argmax._scratch_for(x.device, rows)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    kernel = compiler.load_module(V1_SOURCE, name="argmax_v1").kernel("argmax_rows_v1")
    grid = (-(-vocab // V1_PER_BLOCK), rows)
    compiler.launch(
        kernel, grid, 256, x.data_ptr(), np.int64(x.stride(0)), np.int32(vocab),
        np.int32(V1_PER_BLOCK), keys.data_ptr(), counts.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    return out


def tails(device: str) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]:
    """name -> (the tail on 16-bit logits, bytes moved an element)."""
    out: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
        "old": (lambda h: argmax.argmax_rows(h.float()), 2 + 4 + 4),
        "new": (argmax.argmax_rows, 2),
    }
    if device == "cuda":
        out["v1"] = (lambda h: v1_argmax(h.float()), 2 + 4 + 4)
    return out


def time_us(fn: Callable[[], object], device: str, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if device != "cuda":
        import time

        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def bench(device: str, dtype: torch.dtype, batches: list[int], warmup: int, iters: int) -> list:
    rows = []
    for b in batches:
        # a padded row (8 columns of embedding padding), as the LM head of a padded vocab
        h = torch.randn(b, VOCAB + 8, device=device).to(dtype)[:, :VOCAB]
        h[0, VOCAB // 2] = h[0, VOCAB - 1] = 50.0  # a tie: the first index
        want = h.float().argmax(dim=-1)
        x32 = h.float()
        row: dict[str, float | int | str] = {"batch": b, "vocab": VOCAB, "dtype": str(dtype)}
        variants = dict(tails(device))
        variants["fp32"] = (argmax.argmax_rows, 4)
        for name, (fn, per_elem) in variants.items():
            arg = x32 if name == "fp32" else h
            assert torch.equal(fn(arg), want), name
            us = time_us(functools.partial(fn, arg), device, warmup, iters)
            row[f"{name}_us"] = round(us, 2)
            row[f"{name}_gbps"] = round(b * VOCAB * per_elem / us / 1e3, 1)
        print(
            f"B={b:4d} "
            + " ".join(f"{k[:-3]} {row[k]:8.2f} us" for k in row if k.endswith("_us"))
            + "   new "
            + f"{row['new_gbps']} GB/s",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--output-json")
    args = ap.parse_args()
    if args.device == "cpu":  # a dry run: torch's argmax, small counts
        args.warmup, args.iters = 1, min(args.iters, 2)
        args.batches = [b for b in args.batches if b <= 64]
    rows = bench(args.device, getattr(torch, args.dtype), args.batches, args.warmup, args.iters)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": args.device, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
