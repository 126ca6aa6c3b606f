"""Writing a step's new K/V into their cache slots.

`slot_mapping[t]` is the flat slot of token t: `block_id * block_size + offset`; a negative
slot (padding in a CUDA-graph batch) is skipped. Layout: see cuda/paged_attention.py.
`write_kv_ref` is the pure-torch reference.

FP8 caches (float8_e4m3fn) store K / k_scale and V / v_scale, rounded to nearest and
saturated at +-448; attention multiplies the scales back in. 16/32-bit caches ignore them.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def write_kv_ref(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    if kv_cache.dtype == FP8:
        # index_copy_ has no float8 kernel: move the bytes as uint8.
        flat = flat.view(torch.uint8)
        flat[0].index_copy_(0, slot_mapping, quantize_kv(k, k_scale).view(torch.uint8))
        flat[1].index_copy_(0, slot_mapping, quantize_kv(v, v_scale).view(torch.uint8))
        return
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale as float8_e4m3fn, saturated (the KV write kernel's SATFINITE rounding)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def write_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """The CUDA kernel on GPU tensors (see cuda/kv_write_kernel.py), else the reference."""
    if not kv_cache.is_cuda:
        write_kv_ref(k, v, kv_cache, slot_mapping, k_scale, v_scale)
        return
    from cuda.kv_write_kernel import write_kv_cuda

    write_kv_cuda(k, v, kv_cache, slot_mapping, k_scale, v_scale)
