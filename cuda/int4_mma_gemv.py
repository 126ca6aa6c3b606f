"""The tensor-core W4A16 decode GEMV (cuda/int4_mma_gemv.cu) on the rows layout: variants,
the per-shape rule, launch arguments, and a CPU emulation of the kernel's fragment math.

Layout: the rows layout as loaded (cuda/int4_gemm.py), no repack. A warp reads, per
128-input k-block, 16 channels x 64 contiguous bytes (channels g and g + 8 per lane), which
is the A operand of mma.m16n8k16 once the kernel maps mma's columns to inputs so that A's
16-bit pairs are (nibble s, nibble s + 4) of a word: what one LOP3 extracts (the .cu says
how). So the layout both formats load into already suits the kernel, the dequantize and
prefill paths stay as they are, and HEADRACE_INT4_GEMV=old/split still read the same bytes.

A variant is (WK, U, PF): WK warps of a block split one 16-channel tile's k-blocks into
contiguous runs; each warp loads U k-blocks (2 U 16-byte vectors a lane) before the math,
and with PF = 1 prefetches the next U into L2 first.
Needs K % 128 == 0 and group_size % 128 == 0 (a k-block's mma sums over 128 inputs, so it
must lie in one group); other shapes run the old kernels. x: up to MAX_ROWS rows a launch.

The rule (`choose`), by reasoning until the GPU says otherwise (scripts/bench_int4.py
prints every variant's time and the best per shape): U = 2 with the prefetch (64 registers:
32 warps an SM, ~4 k-blocks in flight a warp); the most warps a block (16, 8, 4) whose grid
still runs in one wave (tiles <= SMs x 32 / WK): ncu found gemv_m1 on 8B down at 12%
achieved occupancy with 256 blocks of 4 warps, and a second, partial wave of blocks that
each make one round trip to HBM costs a whole round trip more; shapes too tall for one
wave even at 4 warps take 4 (the longest runs a warp). At most one warp per k-block.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import torch

from cuda import compiler
from cuda.int4_args import weight_args

SOURCE_PATH = Path(__file__).with_name("int4_mma_gemv.cu")
KB = 128  # inputs per k-block
TILE_N = 16  # channels per block
MAX_ROWS = 8  # x rows a launch (mma's B has 8 columns)
WKS = (4, 8, 16)
US = (2, 4)
VARIANTS = tuple((wk, u, pf) for wk in WKS for u in US for pf in (0, 1))
WARPS_PER_SM = 32  # resident at 64 registers (U = 2)
SMS = 132  # H200; `plan_for` takes the real count
LO_MASK = 0x000F000F  # an argument, not a constant, so ptxas keeps it in a register (.cu)

_source: str | None = None


def kernel_name(wk: int, u: int, pf: int) -> str:
    return f"mma_gemv_w{wk}_u{u}" + ("_pf" if pf else "")


def kernel_names() -> list[str]:
    return [kernel_name(*v) for v in VARIANTS]


def supported(n: int, k: int, group_size: int) -> bool:
    return n > 0 and k % KB == 0 and group_size % KB == 0 and k % group_size == 0


@functools.lru_cache(maxsize=1024)
def choose(n: int, k: int, sms: int = SMS) -> tuple[int, int, int]:
    """(WK, U, PF) for W [n, k] (module docstring)."""
    tiles, kblocks = -(-n // TILE_N), k // KB
    one_wave = [w for w in WKS if tiles <= sms * (WARPS_PER_SM // w) and w <= max(kblocks, 4)]
    return (max(one_wave) if one_wave else WKS[0]), 2, 1


def explain(n: int, k: int, sms: int = SMS) -> str:
    """One line: the rule's pick for W [n, k] and the numbers behind it (the bench prints it)."""
    wk, u, pf = choose(n, k, sms)
    tiles, kblocks = -(-n // TILE_N), k // KB
    waves = tiles * wk / (sms * WARPS_PER_SM)
    return (
        f"{label((wk, u, pf))}: {tiles} tiles x {wk} warps = {waves:.2f} waves of "
        f"{sms} x {WARPS_PER_SM} warps, {-(-kblocks // wk)} k-blocks a warp"
    )


def grid(n: int) -> tuple[int]:
    return (-(-n // TILE_N),)


def label(variant: tuple[int, int, int]) -> str:
    """w{WK}_u{U}[_pf], as the bench and HEADRACE_INT4_MMA_VARIANT name a variant."""
    return kernel_name(*variant).removeprefix("mma_gemv_")


def forced_variant(text: str) -> tuple[int, int, int] | None:
    """HEADRACE_INT4_MMA_VARIANT "w{WK}_u{U}[_pf]" (e.g. w16_u2_pf): that variant for every
    shape (to try a bench's best in W1 without a code change); "": the rule."""
    if not text:
        return None
    m = re.fullmatch(r"w(\d+)_u(\d+)(_pf)?", text)
    variant = (int(m.group(1)), int(m.group(2)), int(bool(m.group(3)))) if m else None
    if variant not in VARIANTS:
        known = [label(v) for v in VARIANTS]
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


def launch_args(x: torch.Tensor, w: object, y: torch.Tensor) -> list:
    """The kernel's arguments, in HR_MW_ARGS order (w: an Int4Weight in the rows layout)."""
    tail = [np.int32(w.group_size), np.int32(x.shape[0]), np.int32(LO_MASK)]  # type: ignore[attr-defined]
    return [*weight_args(x, w, y), *tail]


def _kernel(dtype: torch.dtype, name: str) -> object:
    mod = compiler.load_module(source(), defines=module_defines(dtype), name="int4_mma_gemv")
    return mod.kernel(name)


_sms = compiler.num_sms  # a module name, so tests can fake the SM count


def plan_for(w: object, device: torch.device) -> tuple[int, int, int]:
    """The variant for w (an Int4Weight) on `device`: HEADRACE_INT4_MMA_VARIANT or the rule."""
    if FORCED is not None:
        return FORCED
    return choose(w.out_features, w.in_features, _sms(device))  # type: ignore[attr-defined]


def gemv(
    x: torch.Tensor, w: object, y: torch.Tensor, variant: tuple[int, int, int] | None = None
) -> None:
    """y [M, N] = x [M, K] W^T for M <= 8 rows on the GPU (w: rows layout, no perm,
    `supported`); `variant` (WK, U, PF) overrides the rule (the bench)."""
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x rows {x.shape[0]} outside 1..{MAX_ROWS}")
    v = variant or plan_for(w, x.device)
    kernel = _kernel(x.dtype, kernel_name(*v))
    compiler.launch(kernel, grid(w.out_features), v[0] * 32, *launch_args(x, w, y))  # type: ignore[attr-defined]


# ---- The skinny GEMM (mma_skinny_*, issue 14): decode batches of 9 .. SKINNY_MAX_ROWS ----
#
# A variant is (TW, WK, NT): TW 16-channel tiles a block (warps along N, sharing each staged
# x k-block), WK slices of TW warps splitting K, NT 8-row tiles of x (R = 8 NT rows a launch).
# 256 threads a block. The rule (`skinny_choose`), by reasoning until the bench says
# otherwise: NT = 8 when the launch has more than 32 rows, else NT = 4 (fewer registers: 2
# blocks an SM); the largest TW whose grid still gives 90% of the SMs a block (TW = 8 halves x's
# L2 traffic against TW = 4: x is read M / (4 TW) times the weight's bytes), else smaller TW
# with more K slices; at least 2 k-blocks a slice. Rows are cut into launches of 64 while
# more than 32 remain, then one launch of the rest (NT = 4), so 100 rows are 64 + 36 and
# 150 are 64 + 64 + 22: ceil(M / 64) passes over the weight.
# Expected bounds (H200, by counting, until the bench says otherwise): shared-memory reads
# of x are NT x 2 KB a warp's k-block of 1 KB of weights; at 128 B a clock an SM a full
# NT = 8 launch reads ~8 B of weights a clock an SM, ~2 TB/s (~120 us a pass on the 70B
# gate_up, against ~60 us of HBM); NT = 4 with 9..16 rows reads half the x and stays near
# the HBM rate. The next step past this bound is two tiles a warp sharing each B fragment
# (half the x reads), which needs the scale folded into A to free the t registers.
SKINNY_SHAPES = ((8, 1), (4, 2), (2, 4))  # (TW, WK), 8 warps each
SKINNY_NTS = (4, 8)
SKINNY_VARIANTS = tuple((tw, wk, nt) for nt in SKINNY_NTS for tw, wk in SKINNY_SHAPES)
SKINNY_THREADS = 256
SKINNY_ROWS = 8 * max(SKINNY_NTS)  # rows a launch at most


def skinny_kernel_name(tw: int, wk: int, nt: int) -> str:
    return f"mma_skinny_t{tw}_w{wk}_n{nt}"


def skinny_kernel_names() -> list[str]:
    return [skinny_kernel_name(*v) for v in SKINNY_VARIANTS]


def skinny_label(variant: tuple[int, int, int]) -> str:
    return skinny_kernel_name(*variant).removeprefix("mma_skinny_")


def skinny_shmem(tw: int, wk: int, nt: int) -> int:
    """Dynamic shared memory a block: two x buffers of WK slices x 8 NT rows x 256 bytes,
    which the end's sum (WK x TW warps x NT x 4 x 32 floats) reuses."""
    x_bytes = 2 * wk * 8 * nt * KB * 2
    red = wk * tw * nt * 4 * 32 * 4 if wk > 1 else 0
    return max(x_bytes, red)


def skinny_chunks(m: int) -> list[tuple[int, int, int]]:
    """(first row, rows, NT) of each launch for m rows of x (the rule above)."""
    out, r = [], 0
    while r < m:
        rows = min(SKINNY_ROWS, m - r)
        out.append((r, rows, 8 if rows > 32 else 4))
        r += rows
    return out


@functools.lru_cache(maxsize=1024)
def skinny_choose(n: int, k: int, nt: int, sms: int = SMS) -> tuple[int, int, int]:
    """(TW, WK, NT) for W [n, k] and a launch of NT 8-row tiles (module notes above)."""
    tiles, kblocks = -(-n // TILE_N), k // KB
    fits = [(tw, wk) for tw, wk in SKINNY_SHAPES if kblocks >= 2 * wk or wk == 1]
    for tw, wk in fits:
        if -(-tiles // tw) >= 0.9 * sms:
            return tw, wk, nt
    return (*fits[-1], nt)


def skinny_explain(n: int, k: int, m: int, sms: int = SMS) -> str:
    """One line: the launches for m rows on W [n, k] and each one's variant and grid."""
    parts = []
    for _r, rows, nt in skinny_chunks(m):
        tw, wk, _ = skinny_choose(n, k, nt, sms)
        parts.append(f"{rows} rows {skinny_label((tw, wk, nt))} x {-(-n // (TILE_N * tw))} blocks")
    return "; ".join(parts)


def skinny_grid(n: int, tw: int) -> tuple[int]:
    return (-(-n // (TILE_N * tw)),)


_device_index = compiler.device_index


def skinny(
    x: torch.Tensor, w: object, y: torch.Tensor, variant: tuple[int, int] | None = None
) -> None:
    """y [M, N] = x [M, K] W^T for any M >= 1 on the GPU in launches of up to 64 rows
    (`skinny_chunks`; w: rows layout, no perm, `supported`); `variant` (TW, WK) overrides
    the rule's block shape for every launch (the bench)."""
    m = x.shape[0]
    if m < 1:
        raise ValueError("x has no rows")
    n, k = w.out_features, w.in_features  # type: ignore[attr-defined]
    for r, rows, nt in skinny_chunks(m):
        tw, wk, _ = (*variant, nt) if variant else skinny_choose(n, k, nt, _sms(x.device))
        kernel = _kernel(x.dtype, skinny_kernel_name(tw, wk, nt))
        nbytes = skinny_shmem(tw, wk, nt)
        # Every variant, also those under 48 KB: the opt-in also sets the largest carveout.
        compiler.allow_shared_memory(kernel, nbytes, _device_index(x.device))
        args = launch_args(x[r : r + rows], w, y[r : r + rows])
        compiler.launch(kernel, skinny_grid(n, tw), SKINNY_THREADS, *args, shmem=nbytes)
