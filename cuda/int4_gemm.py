"""W4A16 linear layers: 4-bit weights with per-group fp16 scales and 4-bit zero points.

The layout the kernels read (cuda/int4_gemm.cu draws it), built once at load from AWQ or
GPTQ tensors by worker/quant/int4.py::

    qw      int32 [N, K / 8]   output channel n's inputs in order, 8 per word, nibble j = k 8w + j
    scales  fp16  [N, G]       G = K / group_size
    zeros   uint8 [N, G]
    perm    int64 [K] or None  desc_act: inputs were sorted by group; x is gathered by perm

Why this layout: a decode GEMV streams each output channel's weights as contiguous 16-byte
vectors (32 weights of one group per lane), and both formats' packings reduce to it with
one reorder at load (AWQ packs along N in an interleaved order, GPTQ along K).

A second layout, "tiles" (cuda/int4_tiles.py; `Int4Weight.as_tiles`), holds the same
bytes in the order of mma.sync's fragments: its GEMV (gemv_tiles) unpacks with about half
the instructions per weight and splits K across a block's warps, for up to 8 rows at once.

`int4_linear` runs, for a few rows of x, a GEMV picked by HEADRACE_INT4_GEMV: "v4" (the
default: cuda/int4_v4_gemv.py on the weights the loader put in the stream layout, "mma" on
the others), "mma" (cuda/int4_mma_gemv.py: tensor cores on the rows layout, 8 rows a launch,
up to MMA_MAX_ROWS rows; shapes it does not take run "old"), "old" (gemv_m1/m2/m4 here, 4 rows a
launch) or "split" (cuda/int4_gemv.py, split-K, 8 rows a launch), those two up to
GEMV_MAX_ROWS rows (HEADRACE_INT4_GEMV_ROWS, default 8); the tiles layout runs gemv_tiles
(8 rows a launch, up to 32); on the rows and stream layouts under "mma"/"v4",
SKINNY_MIN_ROWS .. SKINNY_MAX_ROWS rows (default 17 .. 32, HEADRACE_INT4_SKINNY_MIN / _MAX)
run the skinny GEMM (cuda/int4_mma_gemv.py's mma_skinny_*, cuda/int4_v4_gemv.py's
v4_skinny_*: launches of up to 64 rows); with HEADRACE_INT4_TILED_MAX set (default 0: off),
rows- and stream-layout weights take the tiled GEMM (cuda/int4_tiled_gemm.py) from 33 rows (or past
the skinny bounds) up to that many; more rows dequantize into a scratch buffer and
call cuBLAS (prefill: the GEMM dominates); on CPU the reference `int4_linear_ref`
(dequantize, then matmul).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cuda import compiler, int4_gemv, int4_mma_gemv, int4_tiled_gemm, int4_v4_gemv
from cuda.int4_args import weight_args
from cuda.int4_tiles import from_tiles, tiles_ok, to_tiles

SOURCE_PATH = Path(__file__).with_name("int4_gemm.cu")
DTYPES = {torch.bfloat16: 1, torch.float16: 0}
GEMV_KERNELS = {1: "gemv_m1", 2: "gemv_m2", 4: "gemv_m4"}
KERNELS = (*GEMV_KERNELS.values(), "dequant", "gemv_tiles", "dequant_tiles")
ROWS_PER_BLOCK = {"gemv_m1": 16, "gemv_m2": 16, "gemv_m4": 8}  # ROWS x WARPS in the source
THREADS = 128
# Up to this many rows of x run as GEMVs (split: 8 rows a launch; old: 4); more:
# dequantize + cuBLAS.
GEMV_MAX_ROWS = int(os.environ.get("HEADRACE_INT4_GEMV_ROWS", "8"))
# Rows-layout GEMV: "mma" (cuda/int4_mma_gemv.cu, the default), "old" (gemv_m*) or "split"
# (cuda/int4_gemv.cu, split-K). On an H200 (52e44f0) the split-K variants' best per shape only matched gemv_m1 (8B qkv
# 15.2 vs 16.3 us, down 22.9 vs 27.7, gate_up 34.4 vs 31.0) and the rule's pick was slower
# everywhere (BENCHMARKS.md, W4A16 GEMV round 2), so it stays opt-in.
# "v4" (cuda/int4_v4_gemv.cu, round 4, the default since session 8): the loader repacks the
# shapes it takes, up to STREAM_MAX_WEIGHTS, into the stream layout
# (worker/quant/int4_linear.prepare_int4_layers), which it then runs; the rest run "mma".
GEMV_IMPL = os.environ.get("HEADRACE_INT4_GEMV", "v4")
if GEMV_IMPL not in ("mma", "split", "old", "v4"):
    raise ValueError(f"HEADRACE_INT4_GEMV {GEMV_IMPL!r} must be 'mma', 'split', 'old' or 'v4'")
# v4: the largest weight (out x in) that goes to the stream layout. On an H200 (session 8,
# scripts/bench_int4_v4.py, graph replays at M = 1) round 4 beat round 3 on every matrix up to
# 117M weights (8B qkv 11.3 vs 12.7 us, o 9.5 vs 10.7, gate_up 30.1 vs 35.3, down 19.5 vs 21.6;
# 70B qkv 24.0 vs 26.8, o 21.4 vs 22.6) and lost on the 70B's two largest (gate_up, 470M:
# 116.1 vs 108.4 us; down, 235M: 64.0 vs 58.2), so those stay on round 3.
STREAM_MAX_WEIGHTS = int(os.environ.get("HEADRACE_INT4_STREAM_MAX", str(160 * 2**20)))
# mma: up to this many rows run as GEMV launches of 8 (4 launches read 2 B/weight;
# dequantize + cuBLAS moves 4.5 B/weight).
MMA_MAX_ROWS = max(GEMV_MAX_ROWS, 32)
# The skinny GEMM (cuda/int4_mma_gemv.py's mma_skinny_*, issue 14) on the rows layout (and
# cuda/int4_v4_gemv.py's v4_skinny_* on the stream layout, the same rule), for
# SKINNY_MIN_ROWS .. SKINNY_MAX_ROWS rows of x: launches of up to 64 rows, each reading the
# 4-bit weight once (ceil(M / 64) x 0.5 B/weight, where dequantize + cuBLAS moves 4.5).
# Measured on an H200 (session 9, scripts/bench_int4_skinny.py, graphs, L2 flushed, the 8B
# and 70B shapes), the kernel only pays where it replaces several 8-row GEMV passes:
#   M = 32: 1.35-1.85x the four GEMV launches on 7 of 8 shapes (70B down 0.91x);
#   M = 16: 0.59-1.16x the two GEMV launches (it wins on 8B gate_up only);
#   M >= 64: 0.54-0.89x dequantize + cuBLAS at 64, 0.1-0.46x beyond: a 64-row pass takes
#   ~3x a 32-row one (70B gate_up 806 vs 353 us), far from the byte bound, so the pass is
#   bound inside the SM (the next step is a profile of it).
# So the defaults are 17 .. 32 rows; HEADRACE_INT4_SKINNY_MIN / _MAX widen them (the GPU
# tests run it on 9 .. 256), _MAX=0 turns it off (the GEMVs, then dequantize, as before).
SKINNY_MAX_ROWS = int(os.environ.get("HEADRACE_INT4_SKINNY_MAX", "32"))
SKINNY_MIN_ROWS = max(int(os.environ.get("HEADRACE_INT4_SKINNY_MIN", "17")), 9)
# The stream layout (round 4's, all of 8B's weights and 70B's qkv and o) has its own skinny
# kernels (cuda/int4_v4_gemv.py's v4_skinny_*) under the same bounds;
# HEADRACE_INT4_SKINNY_STREAM=0 keeps its old path (8-row GEMVs, then dequantize) alone.
SKINNY_STREAM = os.environ.get("HEADRACE_INT4_SKINNY_STREAM", "1") != "0"
# The tiled GEMM (cuda/int4_tiled_gemm.py, issue 14: 32 x 64 warp tiles, one pass over the
# 4-bit weight per 64 rows; rows layout: any group size that is a multiple of 32) on the rows
# layout under "mma"/"v4" and on the stream layout, for the rows past the GEMV and skinny
# paths (from TILED_MIN_ROWS = 33, or past SKINNY_MAX_ROWS where that is wider) up to
# TILED_MAX_ROWS (HEADRACE_INT4_TILED_MAX; 0 = off). The tiles layout keeps its path.
# Measured on an H200 (session 10, scripts/bench_int4_tiled.py, graphs, L2 flushed, 8B and
# 70B shapes): at 33..64 rows (one 64-row pass) 1.27-2.93x dequantize + cuBLAS on all 8
# shapes (70B gate_up M = 64: 359 vs 596 us; cuBLAS bf16 232); each further 64 rows is
# another pass at the same cost (ncu: one 8-warp block an SM, 2 warps a scheduler, tensor
# pipe 26% busy: latency-bound, not bytes), so at 65..128 rows it is 0.74-1.29x and past
# that it loses. Hence the default 64.
TILED_MAX_ROWS = int(os.environ.get("HEADRACE_INT4_TILED_MAX", "64"))
TILED_MIN_ROWS = 33
DEQUANT_THREADS = 256
TILE_THREADS = 256  # TILE_WARPS x 32 in the source
TILE_MAX_ROWS = 8  # gemv_tiles takes up to 8 rows of x (mma's B has 8 columns)
# Tiles: up to this many rows run as gemv_tiles launches of 8 (4 launches read 2 B/weight;
# dequantize + cuBLAS moves 4.5 B/weight).
TILE_GEMV_MAX_ROWS = max(GEMV_MAX_ROWS, 32)

_source: str | None = None


@dataclass
class Int4Weight:
    qw: torch.Tensor  # int32 [N, K / 8]
    scales: torch.Tensor  # fp16 [N, G]
    zeros: torch.Tensor  # uint8 [N, G]
    group_size: int
    perm: torch.Tensor | None = None  # int64 [K]
    layout: str = "rows"  # "tiles" (cuda/int4_tiles.py) or "stream" (cuda/int4_v4_gemv.py)

    @property
    def out_features(self) -> int:
        return int(self.qw.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.qw.shape[1]) * 8

    def to(self, device: torch.device) -> Int4Weight:
        perm = None if self.perm is None else self.perm.to(device)
        return Int4Weight(
            self.qw.to(device),
            self.scales.to(device),
            self.zeros.to(device),
            self.group_size,
            perm,
            self.layout,
        )

    def without_perm(self) -> Int4Weight:
        return Int4Weight(self.qw, self.scales, self.zeros, self.group_size, None, self.layout)

    def as_tiles(self) -> Int4Weight:
        """The same weight in the tiles layout; ValueError if its shape has none."""
        if self.layout == "tiles":
            return self
        if not tiles_ok(self.out_features, self.in_features, self.group_size):
            raise ValueError(
                f"no tiles layout for N {self.out_features}, K {self.in_features}, group_size "
                f"{self.group_size} (N must be a multiple of 16, K and group_size of 64)"
            )
        qw = to_tiles(self.qw)
        return Int4Weight(qw, self.scales, self.zeros, self.group_size, self.perm, "tiles")

    def as_stream(self) -> Int4Weight:
        """The same weight in round 4's stream layout (from rows); ValueError if none."""
        if self.layout == "stream":
            return self
        if self.layout != "rows" or not int4_v4_gemv.supported(
            self.out_features, self.in_features, self.group_size
        ):
            raise ValueError(
                f"no stream layout for a {self.layout} weight N {self.out_features}, K "
                f"{self.in_features}, group_size {self.group_size} (N % 16, K % 128, group a "
                "power of two >= 64)"
            )
        qw = int4_v4_gemv.to_stream(self.qw)
        return Int4Weight(qw, self.scales, self.zeros, self.group_size, self.perm, "stream")


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> int32 [N, K / 8], nibble j of word w = column 8w + j."""
    n, k = values.shape
    v = values.to(torch.int64).reshape(n, k // 8, 8)
    words = (v << torch.arange(0, 32, 4, device=values.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(qw: torch.Tensor) -> torch.Tensor:
    """int32 [N, K / 8] -> [N, K] values 0..15 (inverse of pack_rows)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qw.device)
    return ((qw.unsqueeze(-1) >> shifts) & 0xF).reshape(qw.shape[0], -1)


def dequantize_ref(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` (inputs in perm order when perm is set)."""
    rows = {"rows": lambda q: q, "tiles": from_tiles, "stream": int4_v4_gemv.from_stream}
    q = unpack_rows(rows[w.layout](w.qw)).float()
    g = torch.arange(w.in_features, device=q.device) // w.group_size
    return ((q - w.zeros.float()[:, g]) * w.scales.float()[:, g]).to(dtype)


def int4_linear_ref(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N]: the CPU path and what the kernels are tested against."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    return F.linear(x, dequantize_ref(w, x.dtype))


def source() -> str:
    global _source
    if _source is None:
        _source = compiler.read_source(SOURCE_PATH)  # pastes elem2_type.cuh
    return _source


def module_defines(dtype: torch.dtype) -> dict[str, int | str]:
    return {"HR_BF16": DTYPES[dtype]}


def unsupported_reason(x: torch.Tensor, w: Int4Weight) -> str | None:
    if not x.is_cuda:
        return "tensors are not on a CUDA device"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (kernels take bf16/fp16)"
    if w.in_features % 32 or w.group_size % 32:
        return f"K {w.in_features} / group_size {w.group_size} not multiples of 32"
    if (
        x.dim() != 2
        or x.stride(1) != 1
        or (x.stride(0) * x.element_size()) % 16
        or x.data_ptr() % 16
    ):
        return "x rows are not contiguous 16-byte aligned vectors"
    return None


def _ptr(t: torch.Tensor) -> int:
    return int(t.data_ptr())


def gemv_launch(x: torch.Tensor, w: Int4Weight, y: torch.Tensor) -> tuple[str, tuple[int], list]:
    """(kernel name, grid, args) for y = x W^T with x of at most 4 rows; no device needed."""
    m = x.shape[0]
    name = GEMV_KERNELS[1 if m == 1 else 2 if m == 2 else 4]
    rows = ROWS_PER_BLOCK[name]
    grid = ((w.out_features + rows - 1) // rows,)
    return name, grid, _gemv_args(x, w, y)


def _gemv_args(x: torch.Tensor, w: Int4Weight, y: torch.Tensor) -> list:
    """The arguments every GEMV kernel (rows and tiles layouts) starts with."""
    return [*weight_args(x, w, y), np.int32(w.group_size)]


def _kernel(dtype: torch.dtype, name: str) -> object:
    mod = compiler.load_module(source(), defines=module_defines(dtype), name="int4_gemm")
    return mod.kernel(name)


def int4_linear(
    x: torch.Tensor,
    w: Int4Weight,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype. `scratch` ([N, K], x's dtype) avoids an
    allocation per call on the dequantize-then-GEMM path; `out` ([M, N]) is written on
    the GEMV path (tests poison it)."""
    if unsupported_reason(x, w) is not None:
        return int4_linear_ref(x, w)
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
        w = w.without_perm()
    if w.layout == "tiles":
        return _tiles_linear(x, w, scratch, out)
    if w.layout == "stream":
        return _stream_linear(x, w, scratch, out)
    # v4 runs round 3 on the shapes left in the rows layout (no stream layout for them).
    if GEMV_IMPL in ("mma", "v4") and _mma_ok(w):
        if skinny_rows(x.shape[0]):
            return _skinny_linear(x, w, out)
        if x.shape[0] <= MMA_MAX_ROWS:
            return _mma_linear(x, w, out)
    if GEMV_IMPL in ("mma", "v4") and tiled_rows(x.shape[0]) and _tiled_ok(w):
        return _tiled_linear(x, w, out)
    if GEMV_IMPL == "split" and x.shape[0] <= GEMV_MAX_ROWS:
        y = _split_linear(x, w, out)
        if y is not None:
            return y
    return _old_linear(x, w, scratch, out)


def _mma_ok(w: Int4Weight) -> bool:
    return int4_mma_gemv.supported(w.out_features, w.in_features, w.group_size)


def skinny_rows(m: int) -> bool:
    """Whether m rows of x take the skinny GEMM (SKINNY_MIN_ROWS .. SKINNY_MAX_ROWS; never
    with SKINNY_MAX_ROWS = 0; the stream layout also needs SKINNY_STREAM)."""
    return SKINNY_MAX_ROWS > 0 and SKINNY_MIN_ROWS <= m <= SKINNY_MAX_ROWS


def tiled_rows(m: int) -> bool:
    """Whether m rows of x take the tiled GEMM on the rows layout: TILED_MIN_ROWS ..
    TILED_MAX_ROWS, past the skinny bounds when those reach further (never with
    TILED_MAX_ROWS = 0)."""
    low = max(TILED_MIN_ROWS, SKINNY_MAX_ROWS + 1)
    return TILED_MAX_ROWS > 0 and low <= m <= TILED_MAX_ROWS


def _tiled_ok(w: Int4Weight) -> bool:
    return int4_tiled_gemm.supported(w.out_features, w.in_features, w.group_size, w.layout)


def _tiled_linear(x: torch.Tensor, w: Int4Weight, out: torch.Tensor | None) -> torch.Tensor:
    """The tiled GEMM, one launch (+ its split-K reduce) for all of x's rows (x gathered
    already, no perm)."""
    m = x.shape[0]
    y = out if out is not None else torch.empty(m, w.out_features, dtype=x.dtype, device=x.device)
    int4_tiled_gemm.gemm(x, w, y)
    return y


def _skinny_linear(x: torch.Tensor, w: Int4Weight, out: torch.Tensor | None) -> torch.Tensor:
    """The skinny GEMM, launches of up to 64 rows of x (x gathered already, no perm)."""
    m = x.shape[0]
    y = out if out is not None else torch.empty(m, w.out_features, dtype=x.dtype, device=x.device)
    int4_mma_gemv.skinny(x, w, y)
    return y


def _mma_linear(x: torch.Tensor, w: Int4Weight, out: torch.Tensor | None) -> torch.Tensor:
    """The tensor-core GEMV, 8 rows of x a launch (x gathered already, no perm)."""
    m, step = x.shape[0], int4_mma_gemv.MAX_ROWS
    y = out if out is not None else torch.empty(m, w.out_features, dtype=x.dtype, device=x.device)
    for r in range(0, m, step):
        int4_mma_gemv.gemv(x[r : r + step], w, y[r : r + step])
    return y


def _stream_linear(
    x: torch.Tensor, w: Int4Weight, scratch: torch.Tensor | None, out: torch.Tensor | None
) -> torch.Tensor:
    """Round 4 (HEADRACE_INT4_GEMV=v4, stream layout): the skinny GEMM for SKINNY_MIN_ROWS ..
    SKINNY_MAX_ROWS rows (unless SKINNY_STREAM is off), else 8 rows of x a launch up to
    MMA_MAX_ROWS rows, else the tiled GEMM where `tiled_rows` (off by default), else
    dequantize + cuBLAS. x is gathered already (no perm)."""
    m, step = x.shape[0], int4_v4_gemv.MAX_ROWS
    if SKINNY_STREAM and skinny_rows(m):
        y = (
            out
            if out is not None
            else torch.empty(m, w.out_features, dtype=x.dtype, device=x.device)
        )
        int4_v4_gemv.skinny(x, w, y)
        return y
    if tiled_rows(m) and _tiled_ok(w):
        return _tiled_linear(x, w, out)
    if m > MMA_MAX_ROWS:
        return F.linear(x, dequantize(w, x.dtype, scratch))
    y = out if out is not None else torch.empty(m, w.out_features, dtype=x.dtype, device=x.device)
    for r in range(0, m, step):
        int4_v4_gemv.gemv(x[r : r + step], w, y[r : r + step])
    return y


def _split_linear(x: torch.Tensor, w: Int4Weight, out: torch.Tensor | None) -> torch.Tensor | None:
    """The split-K GEMV, 8 rows of x a launch; None (nothing launched) if a launch would
    not fit its shared memory or split workspace."""
    m, step = x.shape[0], int4_gemv.MAX_ROWS
    chunks = [(r, int4_gemv.plan_for(min(step, m - r), w, x.device)) for r in range(0, m, step)]
    if not all(plan.fits(w.out_features, min(step, m - r)) for r, plan in chunks):
        return None
    y = out if out is not None else torch.empty(m, w.out_features, dtype=x.dtype, device=x.device)
    for r, plan in chunks:
        int4_gemv.gemv(x[r : r + step], w, y[r : r + step], plan)
    return y


def _old_linear(
    x: torch.Tensor, w: Int4Weight, scratch: torch.Tensor | None, out: torch.Tensor | None
) -> torch.Tensor:
    """gemv_m1/m2/m4 (HEADRACE_INT4_GEMV=old) up to GEMV_MAX_ROWS rows, else dequantize +
    cuBLAS. x is gathered already (no perm)."""
    if x.shape[0] == 3:  # the GEMV instantiations take 1, 2 or 4 rows
        x = F.pad(x, (0, 0, 0, 1))
        y4 = _old_linear(x, w, scratch, None)
        if out is None:
            return y4[:3]
        return out.copy_(y4[:3])
    if x.shape[0] <= 4:
        y = (
            out
            if out is not None
            else torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
        )
        name, grid, args = gemv_launch(x, w, y)
        compiler.launch(_kernel(x.dtype, name), grid, THREADS, *args)
        return y
    if x.shape[0] <= GEMV_MAX_ROWS:
        # A few GEMVs of 4 rows read the 4-bit weight once each (0.5 B/weight a launch);
        # dequantize + GEMM writes and reads a 16-bit copy (4.5 B/weight).
        y = (
            out
            if out is not None
            else torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
        )
        for r in range(0, x.shape[0], 4):
            _old_linear(x[r : r + 4], w, scratch, y[r : r + 4])
        return y
    wd = dequantize(w, x.dtype, scratch)
    return F.linear(x, wd)


def _tiles_linear(
    x: torch.Tensor, w: Int4Weight, scratch: torch.Tensor | None, out: torch.Tensor | None
) -> torch.Tensor:
    """The tiles layout: gemv_tiles for up to 8 rows (one launch), several up to
    TILE_GEMV_MAX_ROWS, else dequantize + cuBLAS. x is gathered already (no perm)."""
    m = x.shape[0]
    if m > TILE_GEMV_MAX_ROWS:
        return F.linear(x, dequantize(w, x.dtype, scratch))
    y = out if out is not None else torch.empty(m, w.out_features, dtype=x.dtype, device=x.device)
    for r in range(0, m, TILE_MAX_ROWS):
        xr, yr = x[r : r + TILE_MAX_ROWS], y[r : r + TILE_MAX_ROWS]
        name, grid, args = tiles_launch(xr, w, yr)
        compiler.launch(_kernel(x.dtype, name), grid, TILE_THREADS, *args)
    return y


def tiles_launch(x: torch.Tensor, w: Int4Weight, y: torch.Tensor) -> tuple[str, tuple[int], list]:
    """(kernel name, grid, args) of gemv_tiles for x of at most 8 rows; one block per 16
    output channels."""
    args = [*_gemv_args(x, w, y), np.int32(x.shape[0])]  # then the row count
    return "gemv_tiles", (w.out_features // 16,), args


def dequantize(w: Int4Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] in `dtype` on the GPU (the dequant kernel); reference elsewhere."""
    if not w.qw.is_cuda or dtype not in DTYPES:
        return dequantize_ref(w, dtype)
    if out is None:
        out = torch.empty(w.out_features, w.in_features, dtype=dtype, device=w.qw.device)
    words = w.out_features * w.in_features // 8
    grid = ((words + DEQUANT_THREADS - 1) // DEQUANT_THREADS,)
    args = [
        _ptr(w.qw),
        _ptr(w.scales),
        _ptr(w.zeros),
        _ptr(out),
        np.int32(w.out_features),
        np.int32(w.in_features),
        np.int32(w.group_size),
    ]
    if w.layout == "stream":
        return int4_v4_gemv.dequantize(w, dtype, out)
    name = "dequant" if w.layout == "rows" else "dequant_tiles"
    compiler.launch(_kernel(dtype, name), grid, DEQUANT_THREADS, *args)
    return out
