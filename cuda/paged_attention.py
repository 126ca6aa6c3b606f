"""Paged attention: queries of one flat token batch attend to K/V stored in cache blocks.

KV cache layout, one tensor per layer::

    kv_cache[2, num_blocks, block_size, num_kv_heads, head_dim]
             |      |           |
             |      |           +-- token offset inside the block
             |      +-- physical block id (a request's block table lists its blocks in order)
             +-- 0 = K, 1 = V

A request's token at position p lives in block `block_tables[r, p // block_size]` at
offset `p % block_size`. The step's query tokens are packed back to back: request r owns
rows `query_start_loc[r]:query_start_loc[r+1]`, which are its last `q_len` positions of
`seq_lens[r]` (bottom-right causal alignment: query i of q_len sees keys <= i + seq_len -
q_len). Prefill, chunked prefill and decode are the same call with different q_len.

Every attention path (this reference, worker/cpu_attention.py's SDPA, the CUDA kernels in
cuda/paged_attention_kernels.py, the backends in worker/attention.py) takes the same two
objects: `AttentionMetadata`, the step's batch layout (built once per step by the model
runner), and `AttentionParams`, one layer's constants.

`paged_attention_ref` is the pure-torch reference: what the CUDA kernels are tested against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from cuda.prefill_tiles import TileSpec


@dataclass
class QueryCapture:
    """KV compression's observation windows: each layer's rotated queries of some rows."""

    rows: torch.Tensor  # [R] int64: rows of the flat batch to keep
    layers: list[torch.Tensor] = field(default_factory=list)  # per layer, [R, Hq, D]


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] int32: request r's tokens are rows qsl[r]:qsl[r+1]
    seq_lens: torch.Tensor  # [B] int32: cached length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each token; -1 = padding
    max_query_len: int  # upper bound on q_len (host int; fixed in a CUDA graph)
    max_seq_len: int  # upper bound on seq_len (host int; fixed in a CUDA graph)
    # KV compression (worker/kv_compression.py): queries to keep, and PyramidKV's per-layer
    # lengths and slots ([L, B] / [L, T]) when layers hold different numbers of tokens.
    capture: QueryCapture | None = None
    layer_seq_lens: torch.Tensor | None = None
    layer_slot_mapping: torch.Tensor | None = None
    # Prefill round 2's flat grid (cuda/prefill_tiles.py): [N, 2] int32 (request, row tile)
    # pairs with work, heaviest first, cut for prefill_tile_spec's (group, BM); None: the
    # kernel runs its z grid (CUDA graphs, HEADRACE_PREFILL_GRID=z).
    prefill_tiles: torch.Tensor | None = None
    prefill_tile_spec: TileSpec | None = None
    # A mixed step's leading decode rows and the rest, each with its own metadata, for a
    # backend that runs them on its decode and prefill kernels apart (worker/decode_split.py).
    decode_split: DecodeSplit | None = None

    def for_layer(self, index: int) -> AttentionMetadata:
        """The metadata layer `index` reads: itself unless layers differ in length."""
        if self.layer_seq_lens is None or self.layer_slot_mapping is None:
            return self
        if index < 0:
            raise RuntimeError("per-layer KV lengths need numbered layers (number_layers)")
        return dataclasses.replace(
            self,
            seq_lens=self.layer_seq_lens[index],
            slot_mapping=self.layer_slot_mapping[index],
            layer_seq_lens=None,
            layer_slot_mapping=None,
        )


@dataclass(frozen=True)
class DecodeSplit:
    """Requests [0, num_decodes) of a step compute one token each (rows [0, num_decodes)):
    `decode` is their metadata, `prefill` the rest's (rows and query_start_loc from 0)."""

    num_decodes: int
    decode: AttentionMetadata
    prefill: AttentionMetadata


@dataclass(frozen=True, slots=True)
class AttentionParams:
    """One attention layer's constants."""

    scale: float  # on q . k, usually head_dim ** -0.5
    sliding_window: int | None = None  # a query at p sees keys in (p - window, p]; None: all
    k_scale: float = 1.0  # FP8 caches: K = cache * k_scale (16/32-bit caches ignore it)
    v_scale: float = 1.0  # likewise for V
    kv_written: bool = False  # the step's K/V are in the cache already (cuda/kv_write_rotary.py)


def paged_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    md: AttentionMetadata,
    params: AttentionParams,
    out: torch.Tensor | None = None,  # [T, Hq, D]
) -> torch.Tensor:
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[3]
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    for q_start, q_end, seq_len, k, v in request_kv(kv_cache, md, params, torch.float32):
        q_len = q_end - q_start
        qr = q[q_start:q_end].float().view(q_len, num_kv_heads, group, head_dim)
        # scores: [Hkv, group, q_len, S], fp32 like the kernels
        scores = torch.einsum("qhgd,shd->hgqs", qr, k) * params.scale
        visible = causal_mask(q_len, seq_len, params.sliding_window, q.device)
        scores.masked_fill_(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("hgqs,shd->qhgd", probs, v)
        out[q_start:q_end] = o.reshape(q_len, num_q_heads, head_dim).to(out.dtype)
    return out


def request_kv(
    kv_cache: torch.Tensor, md: AttentionMetadata, params: AttentionParams, dtype: torch.dtype
) -> Iterator[tuple[int, int, int, torch.Tensor, torch.Tensor]]:
    """(q_start, q_end, seq_len, K, V) of each request with query rows this step: K and V
    [seq_len, Hkv, D] in `dtype`, gathered from its blocks (FP8: times their scales)."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
    starts = md.query_start_loc.tolist()
    for r, seq_len in enumerate(md.seq_lens.tolist()):
        q_start, q_end = starts[r], starts[r + 1]
        if q_end == q_start:
            continue
        blocks = md.block_tables[r, : (seq_len + block_size - 1) // block_size].long()
        k = _rows(kv_cache, 0, blocks, params.k_scale, dtype)
        v = _rows(kv_cache, 1, blocks, params.v_scale, dtype)
        shape = (-1, num_kv_heads, head_dim)
        yield q_start, q_end, seq_len, k.reshape(shape)[:seq_len], v.reshape(shape)[:seq_len]


def _rows(
    kv_cache: torch.Tensor, kv: int, blocks: torch.Tensor, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """Blocks `blocks` of K (kv=0) or V (kv=1) in `dtype`; FP8 rows times their scale (read as
    uint8: indexing has no float8 kernel on every device)."""
    if kv_cache.dtype == torch.float8_e4m3fn:
        raw = kv_cache.view(torch.uint8)[kv, blocks].view(torch.float8_e4m3fn)
        return (raw.float() * scale).to(dtype)
    return kv_cache[kv, blocks].to(dtype)


def causal_mask(
    q_len: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """[q_len, S] bool, True where a query sees a key: bottom-right causal alignment (query i
    sees keys <= i + S - q_len), narrowed to the window."""
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible &= k_pos > q_pos - sliding_window
    return visible


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    md: AttentionMetadata,
    params: AttentionParams,
    out: torch.Tensor,  # [T, Hq, D]
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CUDA kernels on GPU tensors (see cuda/paged_attention_kernels.py), else the reference.

    md.max_query_len / md.max_seq_len are upper bounds the caller guarantees (for CUDA
    graphs: fixed maxima, not this step's lengths). No host sync on the CUDA path.
    """
    if not q.is_cuda:
        return paged_attention_ref(q, kv_cache, md, params, out)
    from cuda.paged_attention_kernels import paged_attention_cuda

    return paged_attention_cuda(q, kv_cache, md, params, out, workspace)
