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


def paged_attention_sdpa(
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
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for r, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[r], starts[r + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        blocks = block_tables[r, : (seq_len + block_size - 1) // block_size].long()
        k = _rows(kv_cache, 0, blocks, k_scale, q.dtype)
        k = k.reshape(-1, num_kv_heads, head_dim)[:seq_len]  # [S, Hkv, D]
        v = _rows(kv_cache, 1, blocks, v_scale, q.dtype)
        v = v.reshape(-1, num_kv_heads, head_dim)[:seq_len]
        # SDPA wants [batch, heads, tokens, D] (3-D inputs take its slow math path, 3-4x
        # slower); GQA shares each K/V head across its query group.
        qh = q[q_start:q_end].transpose(0, 1)[None]  # [1, Hq, q_len, D]
        kh = k.transpose(0, 1)[None]  # [1, Hkv, S, D]
        vh = v.transpose(0, 1)[None]
        mask = _mask(q_len, seq_len, sliding_window, q.device)
        o = F.scaled_dot_product_attention(
            qh,
            kh,
            vh,
            attn_mask=mask,
            is_causal=mask is None and q_len > 1,
            scale=scale,
            enable_gqa=num_q_heads != num_kv_heads,
        )  # [1, Hq, q_len, D]
        out[q_start:q_end] = o[0].transpose(0, 1)
    return out


def _rows(
    kv_cache: torch.Tensor, kv: int, blocks: torch.Tensor, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """Blocks `blocks` of K (kv=0) or V (kv=1) in `dtype`; FP8 rows times their scale (read
    as uint8, as the reference does: indexing has no float8 kernel on every device)."""
    if kv_cache.dtype == torch.float8_e4m3fn:
        raw = kv_cache.view(torch.uint8)[kv, blocks].view(torch.float8_e4m3fn)
        return (raw.float() * scale).to(dtype)
    return kv_cache[kv, blocks].to(dtype)


def _mask(
    q_len: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:
    """None when SDPA's own causal flag is exact (no cached prefix, no window, or a decode);
    else the boolean [q_len, S] mask of bottom-right causal alignment (query i sees keys
    <= i + S - q_len), narrowed to the window."""
    if sliding_window is None and (q_len == seq_len or q_len == 1):
        return None
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible &= k_pos > q_pos - sliding_window
    return visible
