"""Quantize weights into AWQ and GPTQ tensors, packed from the formats' definitions.

Written independently of worker/quant/int4.py (which unpacks): a test that packs with the
same code it unpacks with could not catch a wrong nibble order.
"""

from __future__ import annotations

import torch

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word = column order[i]


def quantize_groups(
    w: torch.Tensor,
    group_size: int,
    sym: bool,
    perm: torch.Tensor | None = None,
    pow2_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q [in, out] 0..15, zeros [G, out], scales [G, out] fp16, g_idx [in]).

    perm (desc_act): input rows are grouped in this order, so g_idx is not sorted.
    pow2_scales: each scale rounded up to a power of two, so every (q - z) * s is exact in
    bf16 (4 significant bits times a power of two): a 16-bit twin then holds the very
    weights the 4-bit kernels compute with, and only summation order tells them apart.
    """
    out_f, in_f = w.shape
    size = in_f if group_size == -1 else group_size
    order = perm if perm is not None else torch.arange(in_f)
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_f) // size).to(torch.int32)
    groups = in_f // size
    wt = w.t().float()  # [in, out]
    scales = torch.empty(groups, out_f)
    zeros = torch.empty(groups, out_f, dtype=torch.int32)
    for g in range(groups):
        rows = wt[g_idx == g]
        if sym:
            s = rows.abs().amax(0).clamp(min=1e-6) / 7.5
            z = torch.full((out_f,), 8, dtype=torch.int32)
        else:
            lo, hi = rows.amin(0), rows.amax(0)
            s = ((hi - lo) / 15).clamp(min=1e-6)
            z = torch.round(-lo / s).clamp(0, 15).to(torch.int32)
        if pow2_scales:
            s = torch.exp2(torch.ceil(torch.log2(s)))
            z = z if sym else torch.round(-lo / s).clamp(0, 15).to(torch.int32)
        scales[g], zeros[g] = s, z
    scales = scales.half()
    q = torch.round(wt / scales.float()[g_idx.long()] + zeros[g_idx.long()]).clamp(0, 15)
    return q.to(torch.int32), zeros, scales, g_idx


def dequantized(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """What the checkpoint means: W [out, in] = (q - z) * s, in fp32."""
    g = g_idx.long()
    return ((q - zeros[g]).float() * scales.float()[g]).t()


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[R, C] 0..15 -> int32 [R, C / 8] in AWQ's order."""
    r, c = values.shape
    out = torch.zeros(r, c // 8, dtype=torch.int64)
    for j in range(c // 8):
        for i, col in enumerate(AWQ_PACK_ORDER):
            out[:, j] |= values[:, 8 * j + col].long() << (4 * i)
    return _as_int32(out)


def pack_gptq_rows(values: torch.Tensor) -> torch.Tensor:
    """[R, C] -> int32 [R / 8, C]: nibble i of word (r, c) = row 8r + i."""
    r, c = values.shape
    out = torch.zeros(r // 8, c, dtype=torch.int64)
    for i in range(8):
        out |= values[i::8].long() << (4 * i)
    return _as_int32(out)


def pack_gptq_cols(values: torch.Tensor) -> torch.Tensor:
    """[G, C] -> int32 [G, C / 8]: nibble i of word (g, j) = column 8j + i."""
    g, c = values.shape
    out = torch.zeros(g, c // 8, dtype=torch.int64)
    for i in range(8):
        out |= values[:, i::8].long() << (4 * i)
    return _as_int32(out)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    # Words are unsigned 32-bit patterns; int32 checkpoints store the same bits.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_tensors(
    w: torch.Tensor, group_size: int, pow2_scales: bool = False
) -> dict[str, torch.Tensor]:
    q, z, s, _ = quantize_groups(w, group_size, sym=False, pow2_scales=pow2_scales)
    return {"qweight": pack_awq(q), "qzeros": pack_awq(z), "scales": s}


def gptq_tensors(
    w: torch.Tensor,
    group_size: int,
    sym: bool,
    desc_act: bool,
    seed: int = 0,
    pow2_scales: bool = False,
) -> dict[str, torch.Tensor]:
    perm = (
        torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))
        if desc_act
        else None
    )
    q, z, s, g_idx = quantize_groups(w, group_size, sym, perm, pow2_scales)
    return {
        "qweight": pack_gptq_rows(q),
        "qzeros": pack_gptq_cols(z - 1),  # AutoGPTQ stores zero - 1
        "scales": s,
        "g_idx": g_idx,
    }


def quantized_pair(
    w: torch.Tensor,
    method: str,
    group_size: int,
    sym: bool = False,
    desc_act: bool = False,
    seed: int = 0,
    pow2_scales: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the format's tensors for w [out, in], the fp32 weight [out, in] they encode).

    desc_act: the input order is randperm(in) drawn from `seed` (fused shards that share
    their inputs pass the same seed, as GPTQ's act order is the same for them)."""
    if method == "awq":
        q, z, s, g_idx = quantize_groups(w, group_size, sym=False, pow2_scales=pow2_scales)
        return awq_tensors(w, group_size, pow2_scales), dequantized(q, z, s, g_idx)
    tensors = gptq_tensors(w, group_size, sym, desc_act, seed, pow2_scales)
    perm = (
        torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))
        if desc_act
        else None
    )
    q, z, s, g_idx = quantize_groups(w, group_size, sym, perm, pow2_scales)
    assert torch.equal(g_idx, tensors["g_idx"])
    return tensors, dequantized(q, z, s, g_idx)
