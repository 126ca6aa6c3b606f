"""Writing a step's new K/V into their cache slots.

`slot_mapping[t]` is the flat slot of token t: `block_id * block_size + offset`; a negative
slot (padding in a CUDA-graph batch) is skipped. Layout: see cuda/paged_attention.py.
`write_kv_ref` is the pure-torch reference.
"""

from __future__ import annotations

import torch


def write_kv_ref(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def write_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """The CUDA kernel on GPU tensors (see cuda/kv_write_kernel.py), else the reference."""
    if not kv_cache.is_cuda:
        write_kv_ref(k, v, kv_cache, slot_mapping)
        return
    from cuda.kv_write_kernel import write_kv_cuda

    write_kv_cuda(k, v, kv_cache, slot_mapping)
