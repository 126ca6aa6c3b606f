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
THREADS = 256
IN_DTYPES = {torch.bfloat16: 1, torch.float16: 0}
# HEADRACE_FP8_FUSED=0: the FP8 linear path calls silu_and_mul, then the quant kernel.
ENABLED = os.environ.get("HEADRACE_FP8_FUSED", "1") != "0"


def silu_mul_quant_ref(
    x: torch.Tensor, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_per_token_ref(silu_and_mul_ref(x), static_scale)


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
    compiler.launch(
        mod.kernel("silu_mul_quant_fp8"),
        (t,),
        THREADS,
        x.data_ptr(),
        np.int64(x.stride(0)),
        hq.data_ptr(),
        scales.data_ptr(),
        0 if static_scale is None else static_scale.data_ptr(),
        np.int32(inter // 8),
        np.float32(MIN_SCALE),
    )
    return hq, scales
