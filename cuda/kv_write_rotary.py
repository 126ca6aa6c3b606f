"""Rotary embedding and the KV-cache write in one launch: rotate q and k in place, store the
rotated K and V in their cache slots.

    positions [T] int64, q [T, Hq, D], k / v [T, Hkv, D] (views into the fused qkv row)
    kv_cache [2, num_blocks, block_size, Hkv, D], slot_mapping [T] int64 (< 0: skip)
    cos_sin [max_pos, R] fp32 (cuda/fused_ops.py's table; R < D: partial rotary)

`rotary_write_kv_ref` is the reference: cuda/fused_ops.py's rotary, then cuda/kv_write.py's
write. The kernel (`rotary_kv_write` in cuda/fused_ops.cu) takes 16/32-bit caches of q's
dtype; FP8 caches and layouts it does not take run the two launches as before (rotary, then
write_kv), so the result is the same on every path.
"""

from __future__ import annotations

import numpy as np
import torch

from cuda import fused_ops
from cuda.fused_ops import rotary, rotary_ref, rotary_supported
from cuda.kv_write import write_kv, write_kv_ref
from cuda.step_fusion import step_fusion


def rotary_write_kv_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    rotary_ref(positions, q, k, cos_sin)
    write_kv_ref(k, v, kv_cache, slot_mapping, k_scale, v_scale)


def fused_supported(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin: torch.Tensor,
) -> bool:
    """Whether the one-launch kernel takes these tensors (device aside)."""
    if not rotary_supported(positions, q, k, cos_sin) or positions.dtype != torch.int64:
        return False
    if not positions.is_contiguous() or v.shape != k.shape or v.dtype != q.dtype:
        return False
    if v.stride(2) != 1 or kv_cache.dtype != q.dtype or not kv_cache.is_contiguous():
        return False
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or tuple(kv_cache.shape[3:]) != k.shape[1:]:
        return False
    if slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous():
        return False
    if slot_mapping.shape[0] < q.shape[0]:
        return False
    return all(t.device == q.device for t in (v, kv_cache, slot_mapping))


def fused_launch(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin: torch.Tensor,
) -> fused_ops.Launch:
    """(kernel, grid, block, args) of rotary_kv_write."""
    num_tokens, hq, head_dim = q.shape
    hkv = k.shape[1]
    half = cos_sin.shape[1] // 2
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    args = (
        *fused_ops.rotary_qk_args(positions, q, k),
        v.data_ptr(),
        np.int64(v.stride(0)),
        np.int64(v.stride(1)),
        kv_cache.data_ptr(),
        np.int64(num_slots * hkv * head_dim),
        slot_mapping.data_ptr(),
        np.int32(hkv),
        np.int32(head_dim),
        *fused_ops.rotary_table_args(cos_sin),
    )
    vp = fused_ops.rotary_pairs_per_thread(half, q, k, cos_sin, v, kv_cache)
    grid, block = fused_ops.rotary_geometry(num_tokens, hq + hkv, half, vp)
    return "rotary_kv_write", grid, block, args


def rotary_write_kv(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64
    cos_sin: torch.Tensor,  # [max_pos, R] fp32
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Rotate q, k in place and write K/V to the cache: one kernel on the GPU where it takes
    the tensors, else rotary + write_kv (each its kernel, or its reference on CPU)."""
    if q.shape[0] == 0:
        return
    if not q.is_cuda:
        rotary_write_kv_ref(positions, q, k, v, kv_cache, slot_mapping, cos_sin, k_scale, v_scale)
        return
    if positions.dtype != torch.int64 or not positions.is_contiguous():
        positions = positions.to(torch.int64).contiguous()
    if not (step_fusion() and fused_supported(positions, q, k, v, kv_cache, slot_mapping, cos_sin)):
        rotary(positions, q, k, cos_sin)
        write_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)
        return
    launch = fused_launch(positions, q, k, v, kv_cache, slot_mapping, cos_sin)
    fused_ops._launch(q.dtype, launch)
