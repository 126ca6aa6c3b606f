"""Elementwise ops where Falcon and GPT-NeoX differ from Llama: LayerNorm with bias, GELU.

Like cuda/fused_ops.py: a pure-torch reference (`*_ref`, what runs on CPU and what the GPU
tests compare against) and a dispatcher that sends CUDA tensors of fp32/fp16/bf16 to one
NVRTC kernel (cuda/layer_ops.cu) on torch's current stream, with no host sync, so it can be
captured in a CUDA graph. Layouts the kernels do not take go to the reference.

Layouts::

    layer_norm   x [T, H] (rows stride(1) == 1, any stride(0)), weight [H], bias [H]
    gelu         x [T, I] (rows stride(1) == 1) -> [T, I]; erf ("none") or tanh form
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cuda import compiler

SOURCE_PATH = Path(__file__).with_name("layer_ops.cu")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # HR_DTYPE in the source
KERNELS = ("layer_norm", "gelu_erf", "gelu_tanh")
GELU_BLOCK = 256
MAX_GRID_Y = 65535


# --- references ------------------------------------------------------------------------------


def layer_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """torch's LayerNorm: fp32 mean and variance, one rounding of weight * x_hat + bias."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def gelu_ref(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """torch's GELU: 0.5 x (1 + erf(x / sqrt 2)), or the tanh approximation."""
    return F.gelu(x, approximate=approximate)


# --- which kernel takes which tensors ----------------------------------------------------------


def layer_norm_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    if x.dtype not in DTYPES or x.dim() != 2 or x.numel() == 0 or x.stride(1) != 1:
        return False
    if x.shape[0] >= 2**31:
        return False
    return all(
        t.dtype == x.dtype
        and t.shape == (x.shape[1],)
        and t.is_contiguous()
        and t.device == x.device
        for t in (weight, bias)
    )


def gelu_supported(x: torch.Tensor, approximate: str) -> bool:
    if approximate not in ("none", "tanh") or x.dtype not in DTYPES or x.dim() != 2:
        return False
    if x.numel() == 0 or x.stride(1) != 1 or x.shape[0] >= 2**31:
        return False
    return (x.shape[1] + GELU_BLOCK - 1) // GELU_BLOCK <= MAX_GRID_Y


# --- compilation and launches ------------------------------------------------------------------


def source() -> str:
    return compiler.read_source(SOURCE_PATH)


def module_defines(dtype: torch.dtype) -> dict[str, int | str]:
    return {"HR_DTYPE": DTYPES[dtype]}


Launch = tuple[str, tuple[int, ...], int, tuple[object, ...]]


def layer_norm_launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out: torch.Tensor
) -> Launch:
    num_tokens, hidden = x.shape
    block = min(1024, (hidden + 31) // 32 * 32)
    args = (
        x.data_ptr(),
        np.int64(x.stride(0)),
        weight.data_ptr(),
        bias.data_ptr(),
        out.data_ptr(),
        np.int32(hidden),
        np.float32(eps),
    )
    return "layer_norm", (num_tokens,), block, args


def gelu_launch(x: torch.Tensor, approximate: str, out: torch.Tensor) -> Launch:
    name = "gelu_erf" if approximate == "none" else "gelu_tanh"
    n = x.shape[1]
    args = (x.data_ptr(), np.int64(x.stride(0)), out.data_ptr(), np.int32(n))
    return name, (x.shape[0], (n + GELU_BLOCK - 1) // GELU_BLOCK), GELU_BLOCK, args


def _launch(dtype: torch.dtype, launch: Launch) -> None:
    name, grid, block, args = launch
    mod = compiler.load_module(source(), defines=module_defines(dtype), name="layer_ops")
    compiler.launch(mod.kernel(name), grid, block, *args)


# --- dispatchers -------------------------------------------------------------------------------


def layer_norm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    bias: torch.Tensor,  # [H]
    eps: float,
) -> torch.Tensor:
    if not (x.is_cuda and layer_norm_supported(x, weight, bias)):
        return layer_norm_ref(x, weight, bias, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x.dtype, layer_norm_launch(x, weight, bias, eps, out))
    return out


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:  # [T, I] -> [T, I]
    if not (x.is_cuda and gelu_supported(x, approximate)):
        return gelu_ref(x, approximate)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x.dtype, gelu_launch(x, approximate, out))
    return out
