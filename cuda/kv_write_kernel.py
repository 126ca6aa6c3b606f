"""CUDA KV-cache write: copy each token's K and V rows into its cache slot.

Same arguments as `cuda.kv_write.write_kv_ref`. One thread block per token; each thread
moves 16-byte vectors, so the kernel is dtype-agnostic (it copies bytes). A negative slot
(padding in a CUDA-graph batch) is skipped on the device, with no host sync.
Rows whose byte size or stride is not a multiple of 16 fall back to the reference.
"""

from __future__ import annotations

import numpy as np
import torch

from cuda import compiler
from cuda.kv_write import write_kv_ref

SOURCE = r"""
// Grid (num_tokens), block (min(row_vecs, 256) rounded to a warp). Rows of row_vecs
// 16-byte vectors; cache rows are slot-major: [2][num_slots][row_vecs].
extern "C" __global__ void write_kv(
    const uint4* __restrict__ k, long long k_stride, const uint4* __restrict__ v,
    long long v_stride, uint4* __restrict__ cache, long long v_off,
    const long long* __restrict__ slot_mapping, int row_vecs) {
    const long long t = blockIdx.x;
    const long long slot = slot_mapping[t];
    if (slot < 0) return;
    uint4* dk = cache + slot * row_vecs;
    uint4* dv = dk + v_off;
    const uint4* sk = k + t * k_stride;
    const uint4* sv = v + t * v_stride;
    for (int i = threadIdx.x; i < row_vecs; i += blockDim.x) {
        const uint4 a = __ldg(sk + i);
        const uint4 b = __ldg(sv + i);
        dk[i] = a;
        dv[i] = b;
    }
}
"""


def _vec_layout(t: torch.Tensor) -> int | None:
    """Token stride in 16-byte vectors if t is [T, H, D] with 16-byte-aligned dense rows."""
    es = t.element_size()
    row_bytes = t.shape[1] * t.shape[2] * es
    if t.stride(2) != 1 or t.stride(1) != t.shape[2] or row_bytes % 16:
        return None
    if (t.stride(0) * es) % 16 or t.data_ptr() % 16:
        return None
    return t.stride(0) * es // 16


def write_kv_cuda(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, < 0 = skip
) -> None:
    """Write K/V rows into the cache on torch's current stream (CUDA-graph capturable)."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    if not kv_cache.is_cuda:
        write_kv_ref(k, v, kv_cache, slot_mapping)
        return
    if k.dtype != kv_cache.dtype:
        k = k.to(kv_cache.dtype)
    if v.dtype != kv_cache.dtype:
        v = v.to(kv_cache.dtype)
    k_stride, v_stride = _vec_layout(k), _vec_layout(v)
    if (
        k_stride is None
        or v_stride is None
        or not kv_cache.is_contiguous()
        or kv_cache.data_ptr() % 16
        or slot_mapping.dtype != torch.int64
        or not slot_mapping.is_contiguous()
    ):
        write_kv_ref(k, v, kv_cache, slot_mapping)
        return
    row_vecs = k.shape[1] * k.shape[2] * k.element_size() // 16
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    threads = min(256, (row_vecs + 31) // 32 * 32)
    kernel = compiler.load_module(SOURCE, name="write_kv").kernel("write_kv")
    compiler.launch(
        kernel,
        (num_tokens,),
        threads,
        k.data_ptr(),
        np.int64(k_stride),
        v.data_ptr(),
        np.int64(v_stride),
        kv_cache.data_ptr(),
        np.int64(num_slots * row_vecs),
        slot_mapping.data_ptr(),
        np.int32(row_vecs),
    )
