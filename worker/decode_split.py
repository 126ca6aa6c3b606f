"""A mixed step's decode rows on the decode kernel, its prompt chunks on the prefill kernel.

W2's prefill-heavy mixed steps (~540 decode rows at ~1.5k tokens of context beside ~15
prompt chunks, 16k tokens a step) spent 42% of their kernel time in the prefill kernel
(H200, FP8, scripts/profile_mixed.py, BENCHMARKS.md session 11). That kernel gives each
decode row a whole 128-row query tile for its 4 query rows (one token x the GQA group),
so it streams the row's KV with 32x the tensor work it needs, and its z grid launches
empty tiles for every short request. The decode kernel reads the same KV at ~86% of copy
bandwidth. So when a step's first requests compute one token each (the scheduler puts
running requests first), the metadata carries both halves (`DecodeSplit`) and the CUDA
backend runs one kernel per half into the two row ranges of one output.

Any request with one query row qualifies (a decode, or a prompt's last token): its
attention is one query over its cached length, which is what the decode kernel computes.
HEADRACE_MIXED_SPLIT=0 keeps the whole step on the prefill kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from cuda.paged_attention import AttentionMetadata, AttentionParams, DecodeSplit
from cuda.prefill_tiles import TileSpec, build_tile_map

ENV = "HEADRACE_MIXED_SPLIT"


def enabled() -> bool:
    value = os.environ.get(ENV, "1").strip().lower() or "1"
    if value not in ("0", "1", "false", "true"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value in ("1", "true")


def leading_decodes(query_start_loc: np.ndarray) -> int:
    """How many requests from the first compute one query row each."""
    q_lens = np.diff(query_start_loc)
    longer = np.flatnonzero(q_lens != 1)
    return int(longer[0]) if longer.size else len(q_lens)


def split_metadata(
    md: AttentionMetadata,
    query_start_loc: np.ndarray,  # [B + 1] the host's copy of md's
    seq_lens: np.ndarray,  # [B]
    dev: Callable[[np.ndarray], torch.Tensor],
    tiles: TileSpec | None = None,
) -> DecodeSplit | None:
    """Both halves' metadata when the step starts with one-row requests and has others
    (None otherwise). The decode half's tensors are views of md's; the prefill half gets
    its own query_start_loc (from 0) and, with `tiles`, its own flat-grid tile map."""
    b = len(seq_lens)
    n = leading_decodes(query_start_loc)
    if not 0 < n < b or md.capture is not None or md.layer_seq_lens is not None:
        return None
    decode = AttentionMetadata(
        query_start_loc=md.query_start_loc[: n + 1],
        seq_lens=md.seq_lens[:n],
        block_tables=md.block_tables[:n],
        slot_mapping=md.slot_mapping[:n],
        max_query_len=1,
        max_seq_len=int(seq_lens[:n].max()),
    )
    qsl = np.ascontiguousarray(query_start_loc[n:] - query_start_loc[n])
    prefill = AttentionMetadata(
        query_start_loc=dev(qsl),
        seq_lens=md.seq_lens[n:],
        block_tables=md.block_tables[n:],
        slot_mapping=md.slot_mapping[int(query_start_loc[n]) :],
        max_query_len=int(np.diff(qsl).max()),
        max_seq_len=int(seq_lens[n:].max()),
    )
    if tiles is not None and prefill.max_query_len > 1:
        prefill.prefill_tiles = dev(build_tile_map(qsl, np.ascontiguousarray(seq_lens[n:]), tiles))
        prefill.prefill_tile_spec = tiles
    return DecodeSplit(n, decode, prefill)


Attend = Callable[
    [torch.Tensor, torch.Tensor, AttentionMetadata, AttentionParams, torch.Tensor], torch.Tensor
]


def attend_split(
    attend: Attend,
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,
    split: DecodeSplit,
    params: AttentionParams,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """attend() on each half, into the two row ranges of one [T, Hq, D] output (`out` when
    given, else a new tensor)."""
    if out is None:
        out = torch.empty_like(q)
    n = split.num_decodes
    attend(q[:n], kv_cache, split.decode, params, out[:n])
    attend(q[n:], kv_cache, split.prefill, params, out[n:])
    return out
