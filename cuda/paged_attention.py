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

`paged_attention_ref` is the pure-torch reference: what runs on CPU and what the CUDA
kernels are tested against.
"""

from __future__ import annotations

import torch


def paged_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including this step's tokens
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [T, Hq, D]
    k_scale: float = 1.0,  # FP8 caches: K = cache * k_scale (16/32-bit caches ignore it)
    v_scale: float = 1.0,
) -> torch.Tensor:
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for r, seq_len in enumerate(lens):
        q_start, q_end = starts[r], starts[r + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[r, :num_blocks].long()
        k = _rows(kv_cache, 0, blocks, k_scale).reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = _rows(kv_cache, 1, blocks, v_scale).reshape(-1, num_kv_heads, head_dim)[:seq_len]
        qr = q[q_start:q_end].float().view(q_len, num_kv_heads, group, head_dim)
        # scores: [Hkv, group, q_len, S], fp32 like the kernels
        scores = torch.einsum("qhgd,shd->hgqs", qr, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        scores.masked_fill_(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("hgqs,shd->qhgd", probs, v)
        out[q_start:q_end] = o.reshape(q_len, num_q_heads, head_dim).to(out.dtype)
    return out


def _rows(kv_cache: torch.Tensor, kv: int, blocks: torch.Tensor, scale: float) -> torch.Tensor:
    """Blocks `blocks` of K (kv=0) or V (kv=1) in fp32; FP8 rows times their scale (read as
    uint8: indexing has no float8 kernel on every device)."""
    if kv_cache.dtype == torch.float8_e4m3fn:
        raw = kv_cache.view(torch.uint8)[kv, blocks]
        return raw.view(torch.float8_e4m3fn).float() * scale
    return kv_cache[kv, blocks].float()


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    out: torch.Tensor,  # [T, Hq, D]
    *,
    max_query_len: int,
    max_seq_len: int,
    workspace: torch.Tensor | None = None,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The CUDA kernels on GPU tensors (see cuda/paged_attention_kernels.py), else the reference.

    max_query_len / max_seq_len are upper bounds the caller guarantees (for CUDA graphs:
    fixed maxima, not this step's lengths). No host sync on the CUDA path.
    """
    if not q.is_cuda:
        return paged_attention_ref(
            q,
            kv_cache,
            query_start_loc,
            seq_lens,
            block_tables,
            scale,
            sliding_window,
            out=out,
            k_scale=k_scale,
            v_scale=v_scale,
        )
    from cuda.paged_attention_kernels import paged_attention_cuda

    return paged_attention_cuda(
        q,
        kv_cache,
        query_start_loc,
        seq_lens,
        block_tables,
        scale,
        out,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        workspace=workspace,
        sliding_window=sliding_window,
        k_scale=k_scale,
        v_scale=v_scale,
    )
