"""Compile the NVRTC modules a W1 run, the attention and the int4 GPU tests load, in parallel processes,
into the on-disk cubin cache (cuda/compiler.py), so that the timed steps of
scripts/gpu_bench.sh do not each wait for compiles one after another on a fresh machine.

    python scripts/warm_kernels.py [--arch sm_90] [--jobs 8] [--only decode | MODULE ...]

--only decode: the decode-attention modules alone (every HEADRACE_DECODE_CONFIG variant of
the tensor-core kernel and the old kernels, bf16/fp16 x head_dim 64/128), for gpu_bench's
decode2 step; --only MODULE ...: the modules of those names (e.g. prefill_attention_v2, the
prefill kernel's).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from cuda import (
    argmax,
    compiler,
    decode_attention,
    fused_ops,
    gemv,
    gemv_step,
    int4_gemm,
    int4_gemv,
    int4_mma_gemv,
    int4_tiled_gemm,
    int4_v4_gemv,
    kv_write_kernel,
    layer_ops,
    norm_quant,
    prefill_v2,
)
from cuda import paged_attention_kernels as pak

Job = tuple[str, str, dict[str, int | str]]  # (module name, source, defines)


def jobs() -> list[Job]:
    """The modules as their loaders compile them (same name, source and defines)."""
    out: list[Job] = []
    for dtype in (torch.bfloat16, torch.float16):
        for m_t in int4_gemv.M_TEMPLATES:
            out.append(("int4_gemv", int4_gemv.source(), int4_gemv.module_defines(dtype, m_t)))
        out.append(("int4_gemm", int4_gemm.source(), int4_gemm.module_defines(dtype)))
        for v in gemv_step.VARIANTS:  # the default one for W1, the others for bench_gemv
            out.append(("gemv_step", gemv_step.source(), gemv_step.module_defines(dtype, v)))
        out.append(("gemv", gemv.source(), gemv.module_defines(dtype)))
        # int4_mma_gemv: the round-3 GEMVs and the skinny GEMM (mma_skinny_*, one module)
        out.append(("int4_mma_gemv", int4_mma_gemv.source(), int4_mma_gemv.module_defines(dtype)))
        out.append(("int4_v4_gemv", int4_v4_gemv.source(), int4_v4_gemv.module_defines(dtype)))
        # the tiled GEMM (issue 14, HEADRACE_INT4_TILED_MAX): tiled_gemm + tiled_reduce
        out.append(
            ("int4_tiled_gemm", int4_tiled_gemm.source(), int4_tiled_gemm.module_defines(dtype))
        )
        for head_dim in (64, 128):  # the attention kernels the GPU tests and benches load
            defines = decode_attention.module_defines(dtype, head_dim)
            out.append(("decode_attention", decode_attention.source(), defines))
    bf16 = torch.bfloat16
    out.append(("paged_attention", pak.source(), pak.module_defines(bf16, 128, None)))
    out.append(("fused_ops", fused_ops.source(), fused_ops.module_defines(bf16)))
    out.append(("layer_ops", layer_ops.source(), layer_ops.module_defines(bf16)))
    # the FP8 models (HEADRACE_FP8_NORM_QUANT) and its GPU tests
    for dtype in (torch.bfloat16, torch.float16):
        out.append(("norm_quant", norm_quant.source(), norm_quant.module_defines(dtype)))
    out.append(("write_kv", kv_write_kernel.SOURCE, {}))
    out.append(("argmax", argmax.SOURCE, {}))  # fp32, bf16 and fp16 rows: one module
    for job in decode_jobs():  # every decode variant the GPU tests load (FP8's default too)
        if job not in out:
            out.append(job)
    return out + prefill_v2_jobs()


def decode_jobs() -> list[Job]:
    """What tests/gpu/test_gpu_decode_*.py and scripts/bench_decode.py load."""
    out: list[Job] = []
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            for text in decode_attention.CONFIGS:
                cfg = decode_attention.parse_config(text)
                defines = decode_attention.module_defines(dtype, head_dim, cfg)
                out.append(("decode_attention", decode_attention.source(), defines))
            for kv_dtype in (None, torch.float8_e4m3fn):
                defines = pak.module_defines(dtype, head_dim, kv_dtype)
                out.append(("paged_attention", pak.source(), defines))
    for dtype in (torch.bfloat16, torch.float16):  # HEADRACE_DECODE_PLAN=v3's picks (its merge)
        for head_dim in (64, 128):
            for text in ("w2s3", "w4s3", "w4s4"):
                cfg = decode_attention.parse_config(text)
                defines = decode_attention.module_defines(dtype, head_dim, cfg, merge3=True)
                out.append(("decode_attention", decode_attention.source(), defines))
    out.append(("write_kv", kv_write_kernel.SOURCE, {}))
    return out


def prefill_v2_jobs() -> list[Job]:
    """The prefill kernel's modules (round 2, 16-bit and FP8 KV): part of the default set,
    and `--only prefill_attention_v2` alone."""
    out: list[Job] = []
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            for fp8 in (False, True):
                defines = prefill_v2.module_defines(dtype, head_dim, fp8)
                out.append(("prefill_attention_v2", prefill_v2.source(), defines))
    return out


def _compile(job: Job, arch: str) -> tuple[str, float]:
    name, source, defines = job
    t0 = time.perf_counter()
    compiler.compile_cubin(source, arch=arch, defines=defines, name=name)
    return f"{name} {defines}", time.perf_counter() - t0


def select(only: list[str]) -> list[Job]:
    """The jobs --only names: the decode family for `decode`, else jobs by module name."""
    picked = decode_jobs() if "decode" in only else []
    named = jobs()
    return picked + [job for job in named if job[0] in only and job not in picked]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="MODULE",
        help="`decode` (the decode-attention family) or module names to warm (default all)",
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    todo = jobs() if args.only is None else select(args.only)
    with ProcessPoolExecutor(args.jobs) as pool:
        for what, secs in pool.map(_compile, todo, [args.arch] * len(todo)):
            print(f"{what}: {secs:.1f} s", flush=True)
    print(f"warmed {len(todo)} modules in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
