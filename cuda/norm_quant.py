"""Add + RMSNorm with the FP8 per-token quantization of its output fused in
(cuda/norm_quant.cu): the input of an FP8 q/k/v or gate/up projection.

    x, residual [T, H] bf16/fp16, weight [H] ->
    (out [T, H], new residual [T, H], xq [T, H] float8_e4m3fn, scales [T, 1] fp32)

out and the residual are cuda/fused_ops.py `add_rms_norm`'s, (xq, scales) cuda/fp8_quant.py
`quantize_per_token(out, static_scale)`'s, bit for bit, in one launch instead of two (the
16-bit out is not re-read). `add_rms_norm_quant_ref` is the torch reference; tensors the
kernel does not take (CPU, fp32, H % 8, unaligned rows) get the two unfused ops.
The model uses it by default (HEADRACE_FP8_NORM_QUANT=0 turns it off): on the H200 it
passed its GPU tests byte for byte and saved 3 us a call at 880 rows, 28-51 us at 8-16k
(BENCHMARKS.md, session 11).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cuda import compiler
from cuda.fp8_quant import FP8, MIN_SCALE, quantize_per_token, quantize_per_token_ref
from cuda.fused_ops import add_rms_norm, add_rms_norm_ref, norm_kernel, norm_launch

SOURCE_PATH = Path(__file__).with_name("norm_quant.cu")
KERNEL = "add_rms_norm_quant_fp8"
DTYPES = {torch.float16: 1, torch.bfloat16: 2}  # HR_DTYPE in the source
ENABLED = os.environ.get("HEADRACE_FP8_NORM_QUANT", "1") != "0"

Result = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def add_rms_norm_quant_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    static_scale: torch.Tensor | None = None,
) -> Result:
    out, res = add_rms_norm_ref(x, residual, weight, eps)
    return (out, res, *quantize_per_token_ref(out, static_scale))


def kernel_ok(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """The fused kernel takes these tensors: add_rms_norm's vector kernel, 16-bit rows."""
    return (
        x.is_cuda
        and x.dtype in DTYPES
        and x.shape[1] % 8 == 0
        and norm_kernel(x, residual, weight) == "add_rms_norm_vec"
    )


def source() -> str:
    return compiler.read_source(SOURCE_PATH)


def module_defines(dtype: torch.dtype) -> dict[str, int | str]:
    return {"HR_DTYPE": DTYPES[dtype]}


def add_rms_norm_quant(
    x: torch.Tensor,  # [T, H]
    residual: torch.Tensor | None,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    static_scale: torch.Tensor | None = None,  # [1] fp32: the consumer's input_scale
    out: Result | None = None,  # (out, res_out, xq, scales) to write into (tests)
) -> Result:
    """(normed, new residual, xq, scales); without a residual the new residual is x (and
    out[1] is not written)."""
    if not kernel_ok(x, residual, weight):
        normed, res = add_rms_norm(x, residual, weight, eps)
        quant = None if out is None else (out[2], out[3])
        xq, xs = quantize_per_token(normed, static_scale, out=quant)
        if out is not None:
            out[0].copy_(normed)
            if residual is not None:
                out[1].copy_(res)
            return out[0], (out[1] if residual is not None else x), xq, xs
        return normed, res, xq, xs
    t, h = x.shape
    if out is None:
        normed = torch.empty((t, h), dtype=x.dtype, device=x.device)
        res_out = None if residual is None else torch.empty_like(normed)
        xq = torch.empty((t, h), dtype=FP8, device=x.device)
        xs = torch.empty((t, 1), dtype=torch.float32, device=x.device)
    else:
        normed, res_out, xq, xs = out
        res_out = None if residual is None else res_out
    for buf, shape in ((normed, (t, h)), (res_out, (t, h)), (xq, (t, h))):
        assert buf is None or (buf.is_contiguous() and buf.shape == shape)
    assert xs.is_contiguous() and xs.numel() == t
    _, grid, block, args = norm_launch(
        "add_rms_norm_vec", x, residual, weight, eps, normed, res_out
    )
    mod = compiler.load_module(source(), defines=module_defines(x.dtype), name="norm_quant")
    compiler.launch(
        mod.kernel(KERNEL),
        grid,
        block,
        *args,
        xq.data_ptr(),
        xs.data_ptr(),
        0 if static_scale is None else static_scale.data_ptr(),
        np.float32(MIN_SCALE),
    )
    return normed, x if res_out is None else res_out, xq, xs
