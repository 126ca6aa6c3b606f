"""Paged attention on CPU: torch's scaled_dot_product_attention over each request's K/V,
gathered from its cache blocks.

The reference in cuda/paged_attention.py materializes every request's full fp32 score
matrix [Hkv, group, q_len, S] with two einsums; a 4,000-token prompt then spends most of
its time allocating and walking those matrices. SDPA's fused CPU kernel tiles the same
computation (flash-attention style: never more than a block of scores at once), so a long
prompt costs what its FLOPs cost. Same inputs, same causal alignment, same results up to
float rounding (tests/test_cpu_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cuda.paged_attention import AttentionMetadata, AttentionParams, causal_mask, request_kv


def paged_attention_sdpa(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    md: AttentionMetadata,
    params: AttentionParams,
    out: torch.Tensor | None = None,  # [T, Hq, D]
) -> torch.Tensor:
    num_q_heads, num_kv_heads = q.shape[1], kv_cache.shape[3]
    if out is None:
        out = torch.empty_like(q)
    for q_start, q_end, seq_len, k, v in request_kv(kv_cache, md, params, q.dtype):
        q_len = q_end - q_start
        # SDPA wants [batch, heads, tokens, D] (3-D inputs take its slow math path, 3-4x
        # slower); GQA shares each K/V head across its query group.
        qh = q[q_start:q_end].transpose(0, 1)[None]  # [1, Hq, q_len, D]
        kh = k.transpose(0, 1)[None]  # [1, Hkv, S, D]
        vh = v.transpose(0, 1)[None]
        mask = _mask(q_len, seq_len, params.sliding_window, q.device)
        o = F.scaled_dot_product_attention(
            qh,
            kh,
            vh,
            attn_mask=mask,
            is_causal=mask is None and q_len > 1,
            scale=params.scale,
            enable_gqa=num_q_heads != num_kv_heads,
        )  # [1, Hq, q_len, D]
        out[q_start:q_end] = o[0].transpose(0, 1)
    return out


def _mask(
    q_len: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:
    """None when SDPA's own causal flag is exact (no cached prefix, no window, or a decode);
    else the reference's boolean [q_len, S] mask."""
    if sliding_window is None and (q_len == seq_len or q_len == 1):
        return None
    return causal_mask(q_len, seq_len, sliding_window, device)
