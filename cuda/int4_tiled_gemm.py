"""The tiled W4A16 GEMM (cuda/int4_tiled_gemm.cu, issue 14) on the rows and stream layouts: 33..512 rows
of x, where the skinny kernel (a 16-channel warp tile) loses to dequantize + cuBLAS. The .cu
header counts it out: warp tiles of 32 channels x 64 rows, blocks of 256 channels x 64 rows
(blockIdx.x the row block), weights and x through a cp.async ring, the scale folded into the
dequantized A (any group size that is a multiple of 32), split-K over grid.z only when the
grid would leave SMs idle, reduced in split order by a second kernel (no atomics).

The split rule (`choose_splits`), by reasoning until the GPU says otherwise: one block an SM
(the kernel's registers and ~192 KB of shared memory); with B = row blocks x channel blocks,
the smallest S (1..16) with B S >= 0.8 SMs, at least 4 k-blocks a split; then S is trimmed
so no split is empty. The reduction reads S x M x N fp32 (small: only small grids split).
Needs K % 128 == 0 and group_size % 32 == 0 (and K % group_size == 0); else `supported` is
False and int4_linear keeps its old path.

The stream layout (cuda/int4_v4_gemv.py: the loader's pick for weights up to
HEADRACE_INT4_STREAM_MAX, all of 8B's) has its own entry, tiled_gemm_stream: the same block,
ring and warp tile; a stage copies the block's 16 units (1 KB each, contiguous); its input map
already pairs x as mma's B wants (no permute pass: B is read from the staged x, swizzled by
row parity), and A registers 1 and 3 are channel g + 8 (dequant2's second constants).
Needs what the layout needs (N % 16 == 0, power-of-two groups >= 64).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from cuda import compiler
from cuda import int4_v4_gemv as v4
from cuda.int4_args import ptr, weight_args

SOURCE_PATH = Path(__file__).with_name("int4_tiled_gemm.cu")
KB = 128  # inputs per k-block
BN = 256  # channels a block
BM = 64  # rows a block
THREADS = 256
STAGES = 5  # TG_STAGES in the .cu
SHMEM = (2 * STAGES + 2) * BM * KB * 2  # ring of weights + x (16 KB each a stage), 2 permuted x
MAX_SPLITS = 16
MIN_KBLOCKS = 4  # k-blocks a split at least
SMS = 132  # H200; `plan` takes the real count
LO_MASK = 0x000F000F  # an argument, not a constant (see cuda/int4_mma_gemv.cu's mw_dequant)
KERNELS = ("tiled_gemm", "tiled_gemm_stream", "tiled_reduce")
REDUCE_THREADS = 256

_source: str | None = None


def supported(n: int, k: int, group_size: int, layout: str = "rows") -> bool:
    """rows: K % 128 == 0, group_size % 32 == 0 dividing K; stream: what the layout itself
    takes (N % 16 == 0, a power-of-two group >= 64: a vector's 64 inputs in one group)."""
    if layout == "stream":
        return v4.supported(n, k, group_size)
    return (
        layout == "rows" and n > 0 and k % KB == 0 and group_size % 32 == 0 and k % group_size == 0
    )


def kernel_name(layout: str) -> str:
    return "tiled_gemm_stream" if layout == "stream" else "tiled_gemm"


def grid_blocks(n: int, m: int) -> tuple[int, int]:
    """(row blocks, channel blocks)."""
    return -(-m // BM), -(-n // BN)


@functools.lru_cache(maxsize=4096)
def choose_splits(n: int, k: int, m: int, sms: int = SMS) -> tuple[int, int]:
    """(S, k-blocks a split) for W [n, k] and m rows (module docstring)."""
    mb, nb = grid_blocks(n, m)
    kblocks = k // KB
    s = 1
    while s < MAX_SPLITS and mb * nb * s < 0.8 * sms and kblocks // (s + 1) >= MIN_KBLOCKS:
        s += 1
    per = -(-kblocks // s)
    return -(-kblocks // per), per  # no empty split


def explain(n: int, k: int, m: int, sms: int = SMS) -> str:
    """One line: the launch for m rows on W [n, k] (the bench prints it)."""
    mb, nb = grid_blocks(n, m)
    s, per = choose_splits(n, k, m, sms)
    return f"{mb}x{nb}x{s} blocks, {per} k-blocks a split" + (" + reduce" if s > 1 else "")


def source() -> str:
    global _source
    if _source is None:
        _source = compiler.read_source(SOURCE_PATH)  # pastes elem2_type.cuh
    return _source


def module_defines(dtype: torch.dtype) -> dict[str, int | str]:
    return {"HR_BF16": 1 if dtype == torch.bfloat16 else 0}


def launch_args(x: torch.Tensor, w: object, y: torch.Tensor, per: int, ws: int) -> list:
    """tiled_gemm's arguments in HR_TG_ARGS order (ws: the workspace pointer, 0 if none)."""
    tail = [np.int32(w.group_size), np.int32(x.shape[0]), np.int32(per), ws, np.int32(LO_MASK)]  # type: ignore[attr-defined]
    return [*weight_args(x, w, y), *tail]


def _kernel(dtype: torch.dtype, name: str) -> object:
    mod = compiler.load_module(source(), defines=module_defines(dtype), name="int4_tiled_gemm")
    return mod.kernel(name)


_sms = compiler.num_sms  # a module name, so tests can fake the SM count


_device_index = compiler.device_index


def gemm(x: torch.Tensor, w: object, y: torch.Tensor, splits: int | None = None) -> None:
    """y [M, N] = x [M, K] W^T on the GPU (w: rows or stream layout, no perm, `supported`;
    x rows 16-byte aligned); `splits` overrides the rule's S (tests, the bench)."""
    m = x.shape[0]
    if m < 1:
        raise ValueError("x has no rows")
    n, k = w.out_features, w.in_features  # type: ignore[attr-defined]
    s, per = choose_splits(n, k, m, _sms(x.device))
    if splits is not None:
        per = -(-(k // KB) // splits)
        s = -(-(k // KB) // per)
    mb, nb = grid_blocks(n, m)
    ws = torch.empty(s, m, n, dtype=torch.float32, device=x.device) if s > 1 else None
    kernel = _kernel(x.dtype, kernel_name(w.layout))  # type: ignore[attr-defined]
    compiler.allow_shared_memory(kernel, SHMEM, _device_index(x.device))
    args = launch_args(x, w, y, per, ptr(ws) if ws is not None else 0)
    compiler.launch(kernel, (mb, nb, s), THREADS, *args, shmem=SHMEM)
    if ws is not None:
        total = m * n
        blocks = min(-(-total // REDUCE_THREADS), 4 * _sms(x.device))
        red = _kernel(x.dtype, "tiled_reduce")
        rargs = [ptr(ws), ptr(y), np.int64(y.stride(0)), np.int32(m), np.int32(n), np.int32(s)]
        compiler.launch(red, (blocks,), REDUCE_THREADS, *rargs)
