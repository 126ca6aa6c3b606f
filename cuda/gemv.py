"""Small-M GEMV for decode-sized linear layers: y = x @ w^T (+ bias), x [M, K] with M <= 8.

    x [M, K] bf16/fp16, w [N, K] (x's dtype), bias [N] or None -> y [M, N]

cuBLAS reaches only ~3.1 TB/s (73% of copy bandwidth) on an H200 for the 8B model's q/k/v and
o matrices at batch 1 and adds a split-K reduce kernel on o and down. Two kernels stream the
weight with no second kernel: cuda/gemv_step.cu (round 2, warps owning rows in one resident
wave, the default) and cuda/gemv.cu (round 1, `gemv`, kept for comparison). `gemv_ref` is
the torch reference of both.

Which path a linear layer takes (`use_gemv` / `linear`, pure host logic, tested on CPU):

    unset / cublas         never a GEMV (F.linear), the default
    auto                   round 2 for the calls of M <= 2 whose weight is at most
                           GEMV2_MAX_WEIGHT_BYTES
    all                    round 2 for every call it takes (M <= 8, aligned rows)
    old                    round 1 for weights up to GEMV_MAX_WEIGHT_BYTES (last session's auto)

scripts/bench_gemv.py measures old, new and cuBLAS on the Llama-3-8B / 70B shapes and prints
the threshold its numbers support.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cuda import compiler, gemv_step

SOURCE_PATH = Path(__file__).with_name("gemv.cu")
DTYPES = {torch.float16: 1, torch.bfloat16: 2}  # HR_DTYPE in the source
MAX_ROWS = 8  # largest M the kernel takes
# The default (`auto`) takes at most 2 rows: on an H200 (a9f0db2, scripts/bench_gemv.py,
# graph replays, L2 flushed) round 2 beats cuBLAS at M = 1 and 2 on the 8B q/k/v, o and down
# (1.08-1.17x) but loses from M = 4 (0.73-0.88x; 0.35-0.45x at M = 8). `all` keeps every M.
AUTO_MAX_ROWS = 2
UNROLL = 2  # chunks per weight row in flight per thread (UNROLL in gemv.cu)
VEC = 8  # elements per 16-byte chunk
MAX_THREADS = 256
KERNELS = tuple(f"gemv_m{m}" for m in range(1, MAX_ROWS + 1))
# The rule's data: weights up to this size go to the GEMV under HEADRACE_GEMV=auto. 64 MiB
# covers the 8B model's fused q/k/v (48 MiB) and o (32 MiB), where cuBLAS is weakest.
GEMV_MAX_WEIGHT_BYTES = 64 * 2**20
# Round 2's: 128 MiB takes the 8B model's q/k/v, o and down (112 MiB; cuBLAS splits K there
# and launches a reduce kernel), not gate/up (224 MiB, where cuBLAS reaches 93% of copy).
# HEADRACE_GEMV_MAX_MIB overrides it (64: q/k/v and o only, down back on cuBLAS).
GEMV2_MAX_WEIGHT_BYTES = 128 * 2**20
MODES = ("auto", "cublas", "all", "old")


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 products and sums, one rounding to x's dtype (the kernel's math)."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gemv_mode() -> str:
    """HEADRACE_GEMV, validated (read per call: tests and benchmarks switch it)."""
    # cuBLAS by default: both GEMVs are opt-in. On an H200 W1 took 4.66 ms per token with
    # round 1 on q/k/v and o and 4.66 ms without (4f22da2), and 5.17 ms with round 2 and its
    # fusions against 4.81 ms without (9c1ad0d, same call), though round 2 alone beats cuBLAS
    # 1.08-1.17x on those shapes in scripts/bench_gemv.py.
    mode = os.environ.get("HEADRACE_GEMV", "cublas") or "cublas"
    if mode not in MODES:
        raise ValueError(f"HEADRACE_GEMV must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def gemv2_max_weight_bytes() -> int:
    """GEMV2_MAX_WEIGHT_BYTES, or HEADRACE_GEMV_MAX_MIB (validated) where set."""
    value = os.environ.get("HEADRACE_GEMV_MAX_MIB", "")
    if not value:
        return GEMV2_MAX_WEIGHT_BYTES
    if not value.isdigit():
        raise ValueError(f"HEADRACE_GEMV_MAX_MIB must be a whole number of MiB, got {value!r}")
    return int(value) * 2**20


def use_gemv(m: int, n: int, k: int, elem_bytes: int, mode: str) -> bool:
    """The rule: does an [m, k] x [n, k]^T product go to the GEMV (layouts aside)?"""
    if mode == "cublas" or not 1 <= m <= (AUTO_MAX_ROWS if mode == "auto" else MAX_ROWS):
        return False
    limit = GEMV_MAX_WEIGHT_BYTES if mode == "old" else gemv2_max_weight_bytes()
    return mode == "all" or n * k * elem_bytes <= limit


def gemv_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Shapes, dtypes and layouts the kernel takes (device aside)."""
    if x.dim() != 2 or weight.dim() != 2 or x.dtype not in DTYPES or weight.dtype != x.dtype:
        return False
    m, k = x.shape
    n = weight.shape[0]
    if not (1 <= m <= MAX_ROWS and n >= 1 and k >= VEC and k % VEC == 0 and weight.shape[1] == k):
        return False
    if n >= 2**31 or m * n >= 2**31:
        return False
    if x.stride(1) != 1 or x.stride(0) % VEC or x.data_ptr() % 16:
        return False
    if not weight.is_contiguous() or weight.data_ptr() % 16:
        return False
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or bias.stride(0) != 1):
        return False
    devices = {x.device, weight.device} | ({bias.device} if bias is not None else set())
    return len(devices) == 1


def rows_for(m: int) -> int:
    """Output features per block for M rows (Rows<M> in gemv.cu)."""
    return 4 if m <= 4 else 2


def threads_for(k: int) -> int:
    """Block size: enough threads that each has UNROLL chunks of a row, at most 256."""
    chunks = k // VEC
    per = -(-chunks // UNROLL)
    return max(32, min(MAX_THREADS, -(-per // 32) * 32))


Launch = tuple[str, tuple[int, ...], int, tuple[object, ...]]


def gemv_launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> Launch:
    """(kernel, grid, block, args) of one GEMV; out [M, N] with stride(1) == 1."""
    m, k = x.shape
    n = weight.shape[0]
    args = (
        x.data_ptr(),
        np.int64(x.stride(0)),
        weight.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        np.int64(out.stride(0)),
        np.int32(n),
        np.int32(k),
    )
    return f"gemv_m{m}", (-(-n // rows_for(m)),), threads_for(k), args


def source() -> str:
    return compiler.read_source(SOURCE_PATH)


def module_defines(dtype: torch.dtype) -> dict[str, int | str]:
    return {"HR_DTYPE": DTYPES[dtype]}


def gemv(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:
    """The kernel on CUDA tensors it takes (gemv_supported), else the reference."""
    if not (x.is_cuda and gemv_supported(x, weight, bias)):
        y = gemv_ref(x, weight, bias)
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    name, grid, block, args = gemv_launch(x, weight, bias, out)
    mod = compiler.load_module(source(), defines=module_defines(x.dtype), name="gemv")
    compiler.launch(mod.kernel(name), grid, block, *args)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, with decode-sized CUDA calls that the rule picks sent to a GEMV."""
    if not (x.is_cuda and x.dim() == 2):
        return F.linear(x, weight, bias)
    mode = gemv_mode()
    if not use_gemv(x.shape[0], weight.shape[0], x.shape[1], x.element_size(), mode):
        return F.linear(x, weight, bias)
    if mode == "old":
        return (
            gemv(x, weight, bias) if gemv_supported(x, weight, bias) else F.linear(x, weight, bias)
        )
    if gemv_step.supported("", x, weight, bias, None):
        return gemv_step.run("", x, weight, bias)
    return F.linear(x, weight, bias)
