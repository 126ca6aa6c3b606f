"""Round 4 of the W4A16 decode GEMV (cuda/int4_v4_gemv.cu, HEADRACE_INT4_GEMV=v4): the
"stream" layout it reads, packed once at load, its variants, the per-shape rule, launch
arguments, and the layout's dequantization for prefill.

Why a new layout: round 3 reads the rows layout as loaded, so one warp load touches 8
channels x 64 bytes (8 lines, half of each), and a warp's k-blocks of one channel sit 64
bytes apart in 16 rows. The stream layout stores each 16-channel x 128-input unit (1 KB)
in the order the warp consumes it, a tile's units back to back: every warp load is 512
contiguous bytes (4 full lines), a warp's run is one contiguous stream, and cp.async can
copy it into a shared-memory ring without registers, which is what lets each warp keep
S - 1 KB in flight (S = 4: ~96 KB an SM at 32 warps, over the ~40 KB that HBM3e's
latency times bandwidth asks for). The nibbles are placed so that one LOP3 + one FMA2
makes an A register, one 16-byte load of x makes four B registers (no PRMT), and each
half k-block lies in one group of 64 (the .cu's header gives the map). Same bytes and
shape as the rows layout (int32 [N, K / 8]), so a layer's parameter is rewritten in place.

A variant is (WK, S): WK warps of a block split one tile's k-blocks into contiguous runs,
S units in each warp's ring. Needs N % 16 == 0, K % 128 == 0 and a power-of-two group
size >= 64 dividing K; other shapes keep the rows layout and the default GEMV.

The rule (`choose`): every warp of the grid resident at once, one wave of streams: the
largest WK (so the shortest runs, the most bytes in flight) whose tiles x WK warps fit
the SMs' resident warps (`resident_warps`) with at least MIN_RUN k-blocks a warp; a shape
too tall for one wave even at WK = 1 takes WK = 1 (long runs, few ramps). S = 4: 32 warps
an SM fit in shared memory at any WK (S = 6 is the bench's alternative).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import torch

from cuda import compiler, step_fusion
from cuda import int4_mma_gemv as mg
from cuda.int4_args import ptr, weight_args

SOURCE_PATH = Path(__file__).with_name("int4_v4_gemv.cu")
KB = 128  # inputs per k-block
TILE_N = 16  # channels per tile
UNIT_WORDS = TILE_N * KB // 8  # int32 words per unit (1 KB)
MAX_ROWS = 8  # x rows a launch
WKS = (1, 2, 4, 8, 16)
SS = (4, 6)
VARIANTS = tuple((wk, s) for wk in WKS for s in SS)
DEFAULT_S = 4
MIN_RUN = 2  # k-blocks a warp at least (a ring of one unit has nothing to overlap)
SMS = 132  # H200; `plan_for` takes the real count
REG_WARPS = 32  # 64 registers a thread (__launch_bounds__) leave 32 warps an SM
MAX_BLOCKS = 32  # resident blocks an SM (sm_90)
SMEM_SM = 228 * 1024  # shared memory an SM; each block also reserves 1 KB
SMEM_BLOCK = 227 * 1024
LO_MASK = 0x000F000F  # in a register, not an immediate (the .cu says why)
DEQUANT_THREADS = 256
CHUNK_NIBBLES = 1 << 24  # to_stream's scratch: ~16 M nibbles (uint8) a pass

_source: str | None = None


def kernel_name(wk: int, s: int) -> str:
    return f"v4_gemv_w{wk}_s{s}"


def kernel_names() -> list[str]:
    return [kernel_name(*v) for v in VARIANTS] + ["v4_dequant_rows"]


def label(variant: tuple[int, int]) -> str:
    return kernel_name(*variant).removeprefix("v4_gemv_")


def supported(n: int, k: int, group_size: int) -> bool:
    pow2 = group_size >= 64 and group_size & (group_size - 1) == 0
    return n > 0 and n % TILE_N == 0 and k % KB == 0 and pow2 and k % group_size == 0


def shmem(wk: int, s: int) -> int:
    """Dynamic shared memory of a block: WK rings of S units."""
    return wk * s * UNIT_WORDS * 4


def resident_warps(wk: int, s: int) -> int:
    """Warps of variant (WK, S) an SM holds: registers, blocks and shared memory."""
    by_smem = SMEM_SM // (shmem(wk, s) + 1024) if shmem(wk, s) <= SMEM_BLOCK else 0
    return min(REG_WARPS, MAX_BLOCKS * wk, by_smem * wk)


@functools.lru_cache(maxsize=1024)
def choose(n: int, k: int, sms: int = SMS, s: int = DEFAULT_S) -> tuple[int, int]:
    """(WK, S) for W [n, k] (module docstring)."""
    tiles, kblocks = -(-n // TILE_N), k // KB
    fits = [
        wk
        for wk in WKS
        if tiles * wk <= sms * resident_warps(wk, s) and (wk == 1 or kblocks // wk >= MIN_RUN)
    ]
    return (max(fits) if fits else 1), s


def explain(n: int, k: int, sms: int = SMS) -> str:
    """One line: the rule's pick for W [n, k] and the numbers behind it (the bench prints it)."""
    wk, s = choose(n, k, sms)
    tiles, kblocks = -(-n // TILE_N), k // KB
    slots = sms * resident_warps(wk, s)
    return (
        f"{label((wk, s))}: {tiles} tiles x {wk} warps = {tiles * wk} of {slots} resident "
        f"warp slots, {-(-kblocks // wk)} k-blocks a warp, {(s - 1) * resident_warps(wk, s)} "
        f"KB in flight an SM when full"
    )


def forced_variant(text: str) -> tuple[int, int] | None:
    """HEADRACE_INT4_V4_VARIANT "w{WK}_s{S}": that variant for every shape; "": the rule."""
    if not text:
        return None
    m = re.fullmatch(r"w(\d+)_s(\d+)", text)
    variant = (int(m.group(1)), int(m.group(2))) if m else None
    if variant not in VARIANTS:
        known = [label(v) for v in VARIANTS]
        raise ValueError(f"HEADRACE_INT4_V4_VARIANT {text!r} is not one of {known}")
    return variant


FORCED = forced_variant(os.environ.get("HEADRACE_INT4_V4_VARIANT", ""))


# The layout. For unit-local (vector j, lane L = 4 g + c, word w, nibble s + 4 h): k-step
# ks = 4 j + w, channel g + 8 (s & 1), input 32 (ks // 2) + 8 c + 4 (ks % 2) + 2 (s >> 1) + h.
def _unit_index(device: torch.device) -> torch.Tensor:
    """[2 * 32 * 4 * 8]: for each stored nibble in order, the unit-local r * 128 + k."""
    j = torch.arange(2, device=device).view(2, 1, 1, 1)
    lane = torch.arange(32, device=device).view(1, 32, 1, 1)
    w = torch.arange(4, device=device).view(1, 1, 4, 1)
    p = torch.arange(8, device=device).view(1, 1, 1, 8)
    g, c, s, h = lane // 4, lane % 4, p % 4, p // 4
    ks = 4 * j + w
    r = g + 8 * (s & 1)
    k = 32 * (ks // 2) + 8 * c + 4 * (ks % 2) + 2 * (s >> 1) + h
    return (r * KB + k).reshape(-1)


def _nibbles(qw: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qw.device)
    return ((qw.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8).reshape(qw.shape[0], -1)


def _pack8(v: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 8] -> int32 [...]: element j in bits 4 j .. 4 j + 3."""
    words = torch.zeros(v.shape[:-1], dtype=torch.int64, device=v.device)
    for j in range(8):
        words |= v[..., j].to(torch.int64) << (4 * j)
    words -= (words >= 2**31).to(torch.int64) << 32
    return words.to(torch.int32)


def to_stream(qw: torch.Tensor) -> torch.Tensor:
    """rows layout int32 [N, K / 8] -> stream layout, same shape (N % 16 == 0, K % 128 == 0).
    Works through CHUNK_NIBBLES at a time, so a 70B gate_up needs no 0.5 GB of scratch."""
    n, k = qw.shape[0], qw.shape[1] * 8
    idx = _unit_index(qw.device)
    out = torch.empty_like(qw)
    step = max(TILE_N, CHUNK_NIBBLES // k // TILE_N * TILE_N)
    for r0 in range(0, n, step):
        rows = min(step, n - r0)
        v = _nibbles(qw[r0 : r0 + rows]).view(rows // TILE_N, TILE_N, k // KB, KB)
        v = v.permute(0, 2, 1, 3).reshape(rows // TILE_N, k // KB, TILE_N * KB)[:, :, idx]
        out[r0 : r0 + rows] = _pack8(v.reshape(rows // TILE_N, k // KB, -1, 8)).view(rows, -1)
    return out


def from_stream(qs: torch.Tensor) -> torch.Tensor:
    """stream layout -> rows layout (inverse of to_stream)."""
    n, k = qs.shape[0], qs.shape[1] * 8
    t = _nibbles(qs).reshape(n // TILE_N, k // KB, TILE_N * KB)
    v = torch.empty_like(t)
    v[:, :, _unit_index(qs.device)] = t
    v = v.view(n // TILE_N, k // KB, TILE_N, KB).permute(0, 2, 1, 3).reshape(n, k)
    return _pack8(v.reshape(n, k // 8, 8))


def group_shift(group_size: int) -> int:
    return group_size.bit_length() - 1


def source() -> str:
    global _source
    if _source is None:
        _source = compiler.read_source(SOURCE_PATH)  # pastes elem2_type.cuh
    return _source


def module_defines(dtype: torch.dtype) -> dict[str, int | str]:
    return {"HR_BF16": 1 if dtype == torch.bfloat16 else 0}


def launch_args(x: torch.Tensor, w: object, y: torch.Tensor) -> list:
    """The kernel's arguments, in HR_V4_ARGS order (w: an Int4Weight in the stream layout)."""
    gs = group_shift(w.group_size)  # type: ignore[attr-defined]
    return [*weight_args(x, w, y), np.int32(gs), np.int32(x.shape[0]), np.int32(LO_MASK)]


def _kernel(dtype: torch.dtype, name: str) -> object:
    mod = compiler.load_module(source(), defines=module_defines(dtype), name="int4_v4_gemv")
    return mod.kernel(name)


_sms = compiler.num_sms  # a module name, so tests can fake the SM count


_device_index = compiler.device_index


def plan_for(w: object, device: torch.device) -> tuple[int, int]:
    """The variant for w on `device`: HEADRACE_INT4_V4_VARIANT or the rule."""
    if FORCED is not None:
        return FORCED
    return choose(w.out_features, w.in_features, _sms(device))  # type: ignore[attr-defined]


def gemv(
    x: torch.Tensor, w: object, y: torch.Tensor, variant: tuple[int, int] | None = None
) -> None:
    """y [M, N] = x [M, K] W^T for M <= 8 (w: stream layout, no perm, `supported`);
    `variant` (WK, S) overrides the rule (the bench)."""
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x rows {x.shape[0]} outside 1..{MAX_ROWS}")
    wk, s = variant or plan_for(w, x.device)
    kernel = _kernel(x.dtype, kernel_name(wk, s))
    nbytes = shmem(wk, s)
    # Every variant, also those under 48 KB: the opt-in sets the largest shared-memory
    # carveout, without which an SM might not hold the 32 warps' rings (resident_warps).
    compiler.allow_shared_memory(kernel, nbytes, _device_index(x.device))
    grid = (w.out_features // TILE_N,)  # type: ignore[attr-defined]
    args = launch_args(x, w, y)
    compiler.launch(kernel, grid, wk * 32, *args, shmem=nbytes, pdl=step_fusion.pdl())


def dequantize(w: object, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """W [N, K] in `dtype` from the stream layout (v4_dequant_rows), into `out`."""
    n, k = w.out_features, w.in_features  # type: ignore[attr-defined]
    args = [
        ptr(w.qw),  # type: ignore[attr-defined]
        ptr(w.scales),  # type: ignore[attr-defined]
        ptr(w.zeros),  # type: ignore[attr-defined]
        ptr(out),
        np.int32(n),
        np.int32(k),
        np.int32(group_shift(w.group_size)),  # type: ignore[attr-defined]
    ]
    grid = (-(-n * k // 8 // DEQUANT_THREADS),)
    compiler.launch(_kernel(dtype, "v4_dequant_rows"), grid, DEQUANT_THREADS, *args)
    return out


# ---- The skinny GEMM on the stream layout (v4_skinny_*, issue 14) ----
# The same block shapes, launch chunking (up to 64 rows a launch), rule and shared-memory
# size as round 3's (cuda/int4_mma_gemv.py's skinny_* say why); only the weight reads differ.
SKINNY_VARIANTS = mg.SKINNY_VARIANTS


def skinny_kernel_name(tw: int, wk: int, nt: int) -> str:
    return f"v4_skinny_t{tw}_w{wk}_n{nt}"


def skinny_kernel_names() -> list[str]:
    return [skinny_kernel_name(*v) for v in SKINNY_VARIANTS]


def skinny(
    x: torch.Tensor, w: object, y: torch.Tensor, variant: tuple[int, int] | None = None
) -> None:
    """y [M, N] = x [M, K] W^T for any M >= 1 (w: stream layout, no perm, `supported`), in
    launches of up to 64 rows (mg.skinny_chunks); `variant` (TW, WK) overrides the rule."""
    m = x.shape[0]
    if m < 1:
        raise ValueError("x has no rows")
    n, k = w.out_features, w.in_features  # type: ignore[attr-defined]
    for r, rows, nt in mg.skinny_chunks(m):
        tw, wk, _ = (*variant, nt) if variant else mg.skinny_choose(n, k, nt, _sms(x.device))
        kernel = _kernel(x.dtype, skinny_kernel_name(tw, wk, nt))
        nbytes = mg.skinny_shmem(tw, wk, nt)
        compiler.allow_shared_memory(kernel, nbytes, _device_index(x.device))
        args = launch_args(x[r : r + rows], w, y[r : r + rows])
        grid = mg.skinny_grid(n, tw)
        compiler.launch(kernel, grid, mg.SKINNY_THREADS, *args, shmem=nbytes, pdl=step_fusion.pdl())
