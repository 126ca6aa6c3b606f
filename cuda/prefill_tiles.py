"""The flat grid of prefill round 2 (cuda/prefill_attention_v2.cu): a work list of row tiles.

The z grid launches (num_kv_heads, batch, ceil(max_query_len * group / BM)) blocks: in a
mixed step of ~600 decode rows beside a few 2k-token chunks, every decode row's 63 empty
row tiles are scheduled, read their bounds and exit, in every layer. The flat grid launches
(num_kv_heads, len(tile_map)) blocks instead, block y running the pair tile_map[y]:

    request r: q_len * group rows, cut into BM-row tiles from the end (tile 0 is the last
               BM rows, the heaviest: its rows see the most keys; the first is partial)
    tile_map:  [N, 2] int32, (r, z) for every tile of every request with q_len > 0 and
               seq_len > 0, ordered by the keys the tile reads (longest first, so the
               heaviest tiles start first and the tail stays short), then by (r, z)

Built on the host with numpy once per step, from the step's query_start_loc and seq_lens,
for one (group, BM): the pair it was built for travels with it (`TileSpec`), and a kernel
of another group or BM runs the z grid instead. Sliding windows skip keys inside a tile,
never a whole tile (each row sees its own key), so one map serves every layer; the work
ordering counts full-attention keys. CUDA-graph steps carry no map and run the z grid.

HEADRACE_PREFILL_GRID selects it: `z` (default) or `flat`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

ENV = "HEADRACE_PREFILL_GRID"
GRIDS = ("z", "flat")
DEFAULT_GRID = "z"
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y; a longer map runs the z grid


@dataclass(frozen=True, slots=True)
class TileSpec:
    """What a tile map is cut for; the kernel uses a map only when both match its own."""

    group: int  # query heads per KV head (rows per token in a tile)
    block_m: int  # rows per tile (the kernel configuration's BM)

    def __post_init__(self) -> None:
        if self.group < 1:
            raise ValueError(f"TileSpec.group must be >= 1, got {self.group}")
        if self.block_m < 1:
            raise ValueError(f"TileSpec.block_m must be >= 1, got {self.block_m}")


def grid_from_env(environ: dict[str, str] | None = None) -> str:
    """HEADRACE_PREFILL_GRID's value: 'z' (default) or 'flat'."""
    env = environ if environ is not None else os.environ
    value = env.get(ENV, DEFAULT_GRID).strip() or DEFAULT_GRID
    if value not in GRIDS:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(GRIDS)}")
    return value


def tile_work(
    q_lens: np.ndarray, seq_lens: np.ndarray, tiles: np.ndarray, spec: TileSpec
) -> np.ndarray:
    """Keys each (r, z) tile reads: up to its last row's last visible key (the kernel's
    kv_hi). [N] int64."""
    r, z = tiles[:, 0], tiles[:, 1]
    q = q_lens[r].astype(np.int64)
    s = seq_lens[r].astype(np.int64)
    m_end = q * spec.group - z.astype(np.int64) * spec.block_m
    i_hi = (m_end - 1) // spec.group
    return np.minimum(s, i_hi + (s - q) + 1)


def build_tile_map(query_start_loc: np.ndarray, seq_lens: np.ndarray, spec: TileSpec) -> np.ndarray:
    """[N, 2] int32 (request, row tile) of every tile with work, heaviest first."""
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    lens = np.asarray(seq_lens, dtype=np.int64)
    q_lens = qsl[1:] - qsl[:-1]
    live = (q_lens > 0) & (lens > 0)
    counts = np.where(live, -(-q_lens * spec.group // spec.block_m), 0)
    r = np.repeat(np.arange(len(lens), dtype=np.int64), counts)
    # z counts 0.. within each request: position minus the request's first index
    first = np.repeat(np.cumsum(counts) - counts, counts)
    z = np.arange(len(r), dtype=np.int64) - first
    tiles = np.stack([r, z], axis=1)
    work = tile_work(q_lens, lens, tiles, spec)
    # lexsort: the last key is the primary one; (r, z) order breaks ties
    order = np.lexsort((z, r, -work))
    return np.ascontiguousarray(tiles[order], dtype=np.int32)
