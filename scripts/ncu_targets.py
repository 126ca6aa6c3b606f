"""One kernel launch per named target, for Nsight Compute: the target's inputs are built and
the kernel warmed up outside the profiled range, then one call runs between
cudaProfilerStart and cudaProfilerStop. Run under

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \
        python scripts/ncu_targets.py prefill_16k

so only that call's kernels are profiled. Shapes are Llama-3-8B's (32 q heads, 8 KV heads,
head_dim 128, block_size 16, bf16) as in scripts/bench_kernels.py; kernel choices follow the
usual environment variables (HEADRACE_DECODE_KERNEL, HEADRACE_PREFILL_KERNEL, ...).
`--list` prints the target names.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def _bench_kernels():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "bench_kernels", Path(__file__).with_name("bench_kernels.py")
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def attention(
    batch: int, q_len: int, ctx: int, bound: int | None = None, fp8: bool = False
) -> Callable[[], object]:
    """The engine's entry (worker/cuda_attention.py): prefill steps on the prefill kernel
    that HEADRACE_PREFILL_KERNEL names, decode steps on HEADRACE_DECODE_KERNEL's (variant:
    HEADRACE_DECODE_CONFIG). bound: a CUDA graph's seq_len bound (the decode grid's width);
    fp8: an FP8 KV cache."""
    from dataclasses import replace

    from cuda.kv_write import quantize_kv
    from cuda.prefill_attention import attention_cuda, choice_from_env

    bk = _bench_kernels()
    q, cache, md = bk.paged_batch(batch, q_len, ctx)
    if bound is not None:
        md = replace(md, max_seq_len=bound)
    if fp8:
        cache = quantize_kv(cache, 1.0)
    out = torch.empty_like(q)
    workspace = torch.empty(64 << 20, dtype=torch.float32, device="cuda")
    choice = choice_from_env()
    return lambda: attention_cuda(q, cache, md, bk.PARAMS, out, workspace, choice)


def sdpa(batch: int, q_len: int) -> Callable[[], object]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, 32, q_len, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch, 32, q_len, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)

    def run() -> object:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def fp8_gemv(n: int, k: int, m: int = 1) -> Callable[[], object]:
    from cuda import fp8_gemv as g
    from worker.quant.fp8 import quantize_weight_per_channel

    wq, ws = quantize_weight_per_channel(torch.randn(n, k, device="cuda") * 0.05)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    return lambda: g.fp8_gemv(x, wq, ws, None, out=y)


def int4_gemv(
    n: int, k: int, m: int = 1, tiles: bool = False, stream: bool = False, tiled: bool = False
) -> Callable[[], object]:
    """tiled: the tiled GEMM (cuda/int4_tiled_gemm.cu) for 33..512 rows, as
    HEADRACE_INT4_TILED_MAX=512 runs it."""
    from cuda import int4_gemm as ig

    if tiled:
        ig.TILED_MAX_ROWS = 512

    g = k // 128
    w = ig.Int4Weight(
        qw=torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda"),
        scales=(torch.rand(n, g, device="cuda") * 0.01).half(),
        zeros=torch.randint(0, 16, (n, g), dtype=torch.uint8, device="cuda"),
        group_size=128,
    )
    if tiles:
        w = w.as_tiles()
    if stream:  # round 4 (cuda/int4_v4_gemv.cu), as HEADRACE_INT4_GEMV=v4 loads it
        w = w.as_stream()
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    return lambda: ig.int4_linear(x, w, out=y)


def bf16_linear(n: int, k: int, m: int = 1) -> Callable[[], object]:
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    return lambda: torch.nn.functional.linear(x, w)


def gemv2(n: int, k: int, prologue: str = "", residual: bool = False) -> Callable[[], object]:
    """Round 2's decode GEMV (cuda/gemv_step.cu), M = 1, with its prologue / epilogue."""
    from cuda import gemv_step

    bf = torch.bfloat16
    w = torch.randn(n, k, dtype=bf, device="cuda") * 0.02
    x = torch.randn(1, 2 * k if prologue == "silu" else k, dtype=bf, device="cuda")
    nw = torch.ones(k, dtype=bf, device="cuda") if "norm" in prologue else None
    res = torch.randn(1, n, dtype=bf, device="cuda") if residual else None
    y = torch.empty(1, n // 2 if prologue == "norm_pair" else n, dtype=bf, device="cuda")
    return lambda: gemv_step.run(prologue, x, w, None, res, nw, 1e-5, out=y)


TARGETS: dict[str, Callable[[], Callable[[], object]]] = {
    "prefill_2k": lambda: attention(1, 2048, 2048),
    "prefill_4k": lambda: attention(1, 4096, 4096),
    "prefill_16k": lambda: attention(1, 16384, 16384),
    "prefill_4x2k": lambda: attention(4, 2048, 2048),
    "sdpa_2k": lambda: sdpa(1, 2048),
    "sdpa_16k": lambda: sdpa(1, 16384),
    "sdpa_4x2k": lambda: sdpa(4, 2048),
    "decode_64x1k": lambda: attention(64, 1, 1024),
    "decode_64x4k": lambda: attention(64, 1, 4096),
    "decode_64x16k": lambda: attention(64, 1, 16384),
    "decode_8x16k": lambda: attention(8, 1, 16384),
    "decode_1x128_bound128k": lambda: attention(1, 1, 128, bound=131072),  # W1's graphs
    "decode_1x256_bound128k": lambda: attention(1, 1, 256, bound=131072),
    "decode_64x4k_fp8": lambda: attention(64, 1, 4096, fp8=True),
    "fp8_8b_qkv": lambda: fp8_gemv(6144, 4096),
    "fp8_8b_gate_up": lambda: fp8_gemv(28672, 4096),
    "fp8_8b_down": lambda: fp8_gemv(4096, 14336),
    # int4 rows layout: HEADRACE_INT4_GEMV picks the kernel (mma, the default; old; split).
    "int4_8b_qkv": lambda: int4_gemv(6144, 4096),
    "int4_8b_o": lambda: int4_gemv(4096, 4096),
    "int4_8b_gate_up": lambda: int4_gemv(28672, 4096),
    "int4_8b_down": lambda: int4_gemv(4096, 14336),
    "int4_8b_gate_up_tiles_m8": lambda: int4_gemv(28672, 4096, m=8, tiles=True),
    "int4_8b_gate_up_m8": lambda: int4_gemv(28672, 4096, m=8),
    "int4v4_8b_o": lambda: int4_gemv(4096, 4096, stream=True),
    "int4v4_8b_gate_up": lambda: int4_gemv(28672, 4096, stream=True),
    "int4v4_8b_down": lambda: int4_gemv(4096, 14336, stream=True),
    "int4v4_70b_gate_up": lambda: int4_gemv(57344, 8192, stream=True),
    "int4tiled_70b_gate_up_m64": lambda: int4_gemv(57344, 8192, m=64, tiled=True),
    "int4tiled_70b_gate_up_m128": lambda: int4_gemv(57344, 8192, m=128, tiled=True),
    "int4tiled_8b_gate_up_m64": lambda: int4_gemv(28672, 4096, m=64, stream=True, tiled=True),
    "bf16_8b_qkv": lambda: bf16_linear(6144, 4096),
    "bf16_8b_down": lambda: bf16_linear(4096, 14336),
    "gemv2_8b_qkv": lambda: gemv2(6144, 4096),
    "gemv2_8b_qkv_norm": lambda: gemv2(6144, 4096, "norm"),
    "gemv2_8b_o_residual": lambda: gemv2(4096, 4096, residual=True),
    "gemv2_8b_down_silu": lambda: gemv2(4096, 14336, "silu", residual=True),
    "gemv2_8b_gate_up_norm_pair": lambda: gemv2(28672, 4096, "norm_pair"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", nargs="?", choices=sorted(TARGETS))
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list or args.target is None:
        print("\n".join(sorted(TARGETS)))
        return
    torch.manual_seed(0)
    run = TARGETS[args.target]()
    for _ in range(3):  # compile, autotune and warm caches outside the profiled range
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"{args.target}: one call profiled", file=sys.stderr)


if __name__ == "__main__":
    main()
