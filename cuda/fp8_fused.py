"""SiLU-and-mul with the FP8 per-token activation quantization fused in (cuda/fp8_fused.cu).

    gate_up [T, 2I] bf16/fp16 -> (hq [T, I] float8_e4m3fn, scales [T, 1] fp32)

The same numbers as cuda/fused_ops.py `silu_and_mul` followed by cuda/fp8_quant.py
`quantize_per_token`, without writing and re-reading the 16-bit h [T, I] in between.
`silu_mul_quant_ref` is the torch reference; tensors the kernel does not take get it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cuda import compiler
from cuda.fp8_quant import FP8, MIN_SCALE, quantize_per_token_ref
from cuda.fused_ops import silu_and_mul_ref

SOURCE_PATH = Path(__file__).with_name("fp8_fused.cu")
THREADS = 256  # the two-pass fallback's block
MAX_VPT = 8
# The largest block of each register-path kernel (its __launch_bounds__ in the .cu): past
# 3 units a thread, ~64-110 registers, 512 threads keep two row-blocks an SM possible.
MAX_THREADS = {1: 1024, 2: 1024, 3: 1024, 4: 512, 5: 512, 6: 512, 7: 512, 8: 512}
ROW_BLOCK = 256  # small rows share a block of about this many threads
# The staged path (one block a row, h in shared memory, the model sizes): rows of at least
# STAGED_MIN_UNITS units (I >= 4096; shorter ones leave its 256 threads idle) whose h fits
# STAGED_MAX_SMEM (two row-blocks an SM).
STAGED_THREADS = 256
STAGED_MIN_UNITS = 512
STAGED_MAX_SMEM = 112 * 1024
IN_DTYPES = {torch.bfloat16: 1, torch.float16: 0}
# HEADRACE_FP8_FUSED=0: the FP8 linear path calls silu_and_mul, then the quant kernel.
ENABLED = os.environ.get("HEADRACE_FP8_FUSED", "1") != "0"


def silu_mul_quant_ref(
    x: torch.Tensor, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_per_token_ref(silu_and_mul_ref(x), static_scale)


def plan(units: int) -> tuple[int, int, int] | None:
    """(vpt, g, r) of the register path for rows of `units` (I / 8) vectors: g threads a
    row, each holding vpt units, r rows a block; None past what it holds (the two-pass
    kernel). Of the vpt whose group fits its kernel's block, the one with the fewest
    registers a row (~8 a unit held plus ~24 a thread), the larger vpt on a tie."""
    best: tuple[int, int, int, int] | None = None
    for vpt in range(MAX_VPT, 0, -1):
        need = -(-units // vpt)
        # g: a power of two up to a warp (groups tile a warp), else whole warps
        g = 1 << (need - 1).bit_length() if need <= 32 else -(-need // 32) * 32
        if g > MAX_THREADS[vpt]:
            continue
        cost = g * (8 * vpt + 24)
        if best is None or cost < best[0]:
            best = (cost, vpt, g, max(1, min(ROW_BLOCK, MAX_THREADS[vpt]) // g))
    return None if best is None else best[1:]


def path(units: int) -> str:
    """The kernel for rows of `units` (I / 8) vectors: "staged", "regs" (the register path,
    plan(units)) or "two-pass"."""
    if units >= STAGED_MIN_UNITS and units * 16 <= STAGED_MAX_SMEM:
        return "staged"
    return "two-pass" if plan(units) is None else "regs"


def kernel_ok(x: torch.Tensor) -> bool:
    if not x.is_cuda or x.dtype not in IN_DTYPES or x.dim() != 2 or x.shape[0] == 0:
        return False
    inter = x.shape[1] // 2
    return (
        x.shape[1] % 16 == 0  # I % 8 == 0
        and inter > 0
        and x.stride(1) == 1
        and (x.stride(0) * x.element_size()) % 16 == 0
        and x.data_ptr() % 16 == 0
    )


def silu_mul_quant(
    x: torch.Tensor,
    static_scale: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,  # (hq [T, I], scales [T, 1])
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hq, scales) of silu(x[:, :I]) * x[:, I:], quantized per token (or statically)."""
    if not kernel_ok(x):
        ref = silu_mul_quant_ref(x, static_scale)
        if out is None:
            return ref
        out[0].copy_(ref[0])
        out[1].copy_(ref[1])
        return out
    t, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = (
            torch.empty((t, inter), dtype=FP8, device=x.device),
            torch.empty((t, 1), dtype=torch.float32, device=x.device),
        )
    hq, scales = out
    assert hq.is_contiguous() and hq.shape == (t, inter) and scales.numel() == t
    mod = compiler.load_module(
        compiler.read_source(SOURCE_PATH), defines={"HR_BF16": IN_DTYPES[x.dtype]}, name="fp8_fused"
    )
    units = inter // 8
    io = (
        x.data_ptr(),
        np.int64(x.stride(0)),
        hq.data_ptr(),
        scales.data_ptr(),
        0 if static_scale is None else static_scale.data_ptr(),
    )
    rest: tuple[np.int32, ...]
    shmem = 0
    kind = path(units)
    if kind == "staged":
        name, grid, block, rest = (
            "silu_mul_quant_fp8_staged",
            (t,),
            STAGED_THREADS,
            (np.int32(units),),
        )
        shmem = units * 16
    elif kind == "two-pass":  # rows too long for the other paths
        name, grid, block, rest = "silu_mul_quant_fp8", (t,), THREADS, (np.int32(units),)
    else:
        p = plan(units)
        assert p is not None
        vpt, g, r = p
        name, grid, block = f"silu_mul_quant_fp8_v{vpt}", (-(-t // r),), g * r
        rest = (np.int32(t), np.int32(units), np.int32(g))
    kernel = mod.kernel(name)
    if shmem > 48 * 1024:
        compiler.allow_shared_memory(kernel, STAGED_MAX_SMEM, compiler.device_index(x.device))
    compiler.launch(kernel, grid, block, *io, *rest, np.float32(MIN_SCALE), shmem=shmem)
    return hq, scales
