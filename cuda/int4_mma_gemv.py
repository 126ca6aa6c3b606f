"""The tensor-core W4A16 decode GEMV (cuda/int4_mma_gemv.cu) on the rows layout: variants,
the per-shape rule, launch arguments, and a CPU emulation of the kernel's fragment math.

Layout: the rows layout as loaded (cuda/int4_gemm.py), no repack. A warp reads, per
128-input k-block, 16 channels x 64 contiguous bytes (channels g and g + 8 per lane), which
is the A operand of mma.m16n8k16 once the kernel maps mma's columns to inputs so that A's
16-bit pairs are (nibble s, nibble s + 4) of a word: what one LOP3 extracts (the .cu says
how). So the layout both formats load into already suits the kernel, the dequantize and
prefill paths stay as they are, and HEADRACE_INT4_GEMV=old/split still read the same bytes.

A variant is (WK, U): WK warps of a block split one 16-channel tile's k-blocks into
contiguous runs; each warp loads U k-blocks (2 U 16-byte vectors a lane) before the math.
Needs K % 128 == 0 and group_size % 128 == 0 (a k-block's mma sums over 128 inputs, so it
must lie in one group); other shapes run the old kernels. x: up to MAX_ROWS rows a launch.

The rule (`choose`), by reasoning until the GPU says otherwise (scripts/bench_int4.py
prints every variant's time and the best per shape): the fewest warps a block (4, 8, 16)
whose grid has >= WARPS_PER_SM warps per SM (ncu: gemv_m1 on 8B down had 12% achieved
occupancy with 256 blocks of 4 warps), at most one warp per k-block; U = 4 (more bytes in
flight a warp, ~96 registers) only with 4-warp blocks whose warps have >= 8 k-blocks each
(then 5 blocks an SM still hold 20 warps), else U = 2 (64 registers, 32 warps an SM).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import torch

from cuda import compiler

SOURCE_PATH = Path(__file__).with_name("int4_mma_gemv.cu")
KB = 128  # inputs per k-block
TILE_N = 16  # channels per block
MAX_ROWS = 8  # x rows a launch (mma's B has 8 columns)
WKS = (4, 8, 16)
US = (2, 4)
VARIANTS = tuple((wk, u) for wk in WKS for u in US)
WARPS_PER_SM = 32
SMS = 132  # H200; `plan_for` takes the real count

_source: str | None = None


def kernel_name(wk: int, u: int) -> str:
    return f"mma_gemv_w{wk}_u{u}"


def kernel_names() -> list[str]:
    return [kernel_name(wk, u) for wk, u in VARIANTS]


def supported(n: int, k: int, group_size: int) -> bool:
    return n > 0 and k % KB == 0 and group_size % KB == 0 and k % group_size == 0


@functools.lru_cache(maxsize=1024)
def choose(n: int, k: int, sms: int = SMS) -> tuple[int, int]:
    """(WK, U) for W [n, k] (module docstring)."""
    tiles, kblocks = -(-n // TILE_N), k // KB
    wk = next((w for w in WKS if tiles * w >= WARPS_PER_SM * sms), WKS[-1])
    while wk > WKS[0] and wk > kblocks:
        wk //= 2
    per_warp = -(-kblocks // wk)
    return wk, 4 if per_warp >= 8 and wk == WKS[0] else 2


def grid(n: int) -> tuple[int]:
    return (-(-n // TILE_N),)


def forced_variant(text: str) -> tuple[int, int] | None:
    """HEADRACE_INT4_MMA_VARIANT "w{WK}_u{U}" (e.g. w16_u2): that variant for every shape
    (to try a bench's best in W1 without a code change); "": the rule."""
    if not text:
        return None
    m = re.fullmatch(r"w(\d+)_u(\d+)", text)
    variant = (int(m.group(1)), int(m.group(2))) if m else None
    if variant not in VARIANTS:
        known = [f"w{wk}_u{u}" for wk, u in VARIANTS]
        raise ValueError(f"HEADRACE_INT4_MMA_VARIANT {text!r} is not one of {known}")
    return variant


FORCED = forced_variant(os.environ.get("HEADRACE_INT4_MMA_VARIANT", ""))


def source() -> str:
    global _source
    if _source is None:
        _source = compiler.read_source(SOURCE_PATH)  # pastes elem2_type.cuh
    return _source


def module_defines(dtype: torch.dtype) -> dict[str, int | str]:
    return {"HR_BF16": 1 if dtype == torch.bfloat16 else 0}


def _ptr(t: torch.Tensor) -> int:
    return int(t.data_ptr())


def launch_args(x: torch.Tensor, w: object, y: torch.Tensor) -> list:
    """The kernel's arguments, in HR_MW_ARGS order (w: an Int4Weight in the rows layout)."""
    return [
        _ptr(x),
        np.int64(x.stride(0)),
        _ptr(w.qw),  # type: ignore[attr-defined]
        _ptr(w.scales),  # type: ignore[attr-defined]
        _ptr(w.zeros),  # type: ignore[attr-defined]
        _ptr(y),
        np.int64(y.stride(0)),
        np.int32(w.out_features),  # type: ignore[attr-defined]
        np.int32(w.in_features),  # type: ignore[attr-defined]
        np.int32(w.group_size),  # type: ignore[attr-defined]
        np.int32(x.shape[0]),
    ]


def _kernel(dtype: torch.dtype, name: str) -> object:
    mod = compiler.load_module(source(), defines=module_defines(dtype), name="int4_mma_gemv")
    return mod.kernel(name)


_sm_counts: dict[torch.device, int] = {}


def _sms(device: torch.device) -> int:
    count = _sm_counts.get(device)
    if count is None:
        count = _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


def plan_for(w: object, device: torch.device) -> tuple[int, int]:
    """The variant for w (an Int4Weight) on `device`: HEADRACE_INT4_MMA_VARIANT or the rule."""
    if FORCED is not None:
        return FORCED
    return choose(w.out_features, w.in_features, _sms(device))  # type: ignore[attr-defined]


def gemv(
    x: torch.Tensor, w: object, y: torch.Tensor, variant: tuple[int, int] | None = None
) -> None:
    """y [M, N] = x [M, K] W^T for M <= 8 rows on the GPU (w: rows layout, no perm,
    `supported`); `variant` (WK, U) overrides the rule (the bench)."""
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x rows {x.shape[0]} outside 1..{MAX_ROWS}")
    wk, u = variant or plan_for(w, x.device)
    args = launch_args(x, w, y)
    compiler.launch(_kernel(x.dtype, kernel_name(wk, u)), grid(w.out_features), wk * 32, *args)  # type: ignore[attr-defined]
