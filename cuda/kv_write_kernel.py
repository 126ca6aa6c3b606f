"""CUDA KV-cache write: copy each token's K and V rows into its cache slot.

Same arguments as `cuda.kv_write.write_kv_ref`. One thread block per token; each thread
moves 16-byte vectors, so the kernel is dtype-agnostic (it copies bytes). A negative slot
(padding in a CUDA-graph batch) is skipped on the device, with no host sync.
Rows whose byte size or stride is not a multiple of 16 fall back to the reference.

FP8 caches (float8_e4m3fn): `write_kv_fp8_{bf16,f16}` read 8 elements (16 bytes) per
thread step, scale by 1 / k_scale (1 / v_scale), round to nearest with saturation at
+-448 (SATFINITE, as `quantize_kv` in cuda/kv_write.py) and store 8 bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from cuda import compiler
from cuda.kv_write import write_kv_ref

SOURCE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

template <typename T2>
__device__ __forceinline__ float2 to_f2(T2 v);
template <>
__device__ __forceinline__ float2 to_f2<__nv_bfloat162>(__nv_bfloat162 v) {
    return __bfloat1622float2(v);
}
template <>
__device__ __forceinline__ float2 to_f2<__half2>(__half2 v) { return __half22float2(v); }

template <typename T2>
__device__ __forceinline__ uint2 to_fp8x8(const uint4& v, float inv) {
    const T2* p = reinterpret_cast<const T2*>(&v);
    unsigned short q[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 f = to_f2<T2>(p[j]);
        q[j] = __nv_cvt_float2_to_fp8x2(make_float2(f.x * inv, f.y * inv), __NV_SATFINITE,
                                        __NV_E4M3);
    }
    return make_uint2(q[0] | ((unsigned)q[1] << 16), q[2] | ((unsigned)q[3] << 16));
}

// Grid (num_tokens), block (min(row_vecs, 256) rounded to a warp). Rows of row_vecs
// 16-byte source vectors; cache rows are slot-major: [2][num_slots][row_vecs] of Out, the
// cache's unit per source vector (uint4: a 16-bit cache, uint2: 8 FP8 bytes). Convert
// turns a loaded vector into it, given 1 / scale.
template <typename Out, typename Convert>
__device__ __forceinline__ void write_rows(
    const uint4* __restrict__ k, long long k_stride, const uint4* __restrict__ v,
    long long v_stride, Out* __restrict__ cache, long long v_off,
    const long long* __restrict__ slot_mapping, int row_vecs, float k_inv, float v_inv) {
    const long long t = blockIdx.x;
    const long long slot = slot_mapping[t];
    if (slot < 0) return;
    Out* dk = cache + slot * row_vecs;
    Out* dv = dk + v_off;
    const uint4* sk = k + t * k_stride;
    const uint4* sv = v + t * v_stride;
    for (int i = threadIdx.x; i < row_vecs; i += blockDim.x) {
        const uint4 a = __ldg(sk + i);
        const uint4 b = __ldg(sv + i);
        dk[i] = Convert::apply(a, k_inv);
        dv[i] = Convert::apply(b, v_inv);
    }
}

struct Copy {  // 16-bit caches take the bytes as they are
    static __device__ __forceinline__ uint4 apply(const uint4& x, float) { return x; }
};
template <typename T2>
struct ToFp8 {
    static __device__ __forceinline__ uint2 apply(const uint4& x, float inv) {
        return to_fp8x8<T2>(x, inv);
    }
};

extern "C" __global__ void write_kv(
    const uint4* __restrict__ k, long long k_stride, const uint4* __restrict__ v,
    long long v_stride, uint4* __restrict__ cache, long long v_off,
    const long long* __restrict__ slot_mapping, int row_vecs) {
    write_rows<uint4, Copy>(k, k_stride, v, v_stride, cache, v_off, slot_mapping, row_vecs,
                            1.0f, 1.0f);
}

// FP8: row_vecs counts 8-element groups (16 source bytes, 8 cache bytes).
#define HR_WRITE_FP8_ARGS                                                                     \
    const uint4 *__restrict__ k, long long k_stride, const uint4 *__restrict__ v,             \
        long long v_stride, uint2 *__restrict__ cache, long long v_off,                       \
        const long long *__restrict__ slot_mapping, int row_vecs, float k_inv, float v_inv
extern "C" __global__ void write_kv_fp8_bf16(HR_WRITE_FP8_ARGS) {
    write_rows<uint2, ToFp8<__nv_bfloat162>>(k, k_stride, v, v_stride, cache, v_off,
                                             slot_mapping, row_vecs, k_inv, v_inv);
}
extern "C" __global__ void write_kv_fp8_f16(HR_WRITE_FP8_ARGS) {
    write_rows<uint2, ToFp8<__half2>>(k, k_stride, v, v_stride, cache, v_off, slot_mapping,
                                      row_vecs, k_inv, v_inv);
}
"""

FP8 = torch.float8_e4m3fn
FP8_KERNELS = {torch.bfloat16: "write_kv_fp8_bf16", torch.float16: "write_kv_fp8_f16"}


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
    k_scale: float = 1.0,  # FP8 caches only: the cache holds K / k_scale
    v_scale: float = 1.0,
) -> None:
    """Write K/V rows into the cache on torch's current stream (CUDA-graph capturable)."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    if not kv_cache.is_cuda:
        write_kv_ref(k, v, kv_cache, slot_mapping, k_scale, v_scale)
        return
    fp8 = kv_cache.dtype == FP8
    if not fp8:  # the copy kernel moves bytes: sources must already be the cache's dtype
        k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
    kernel = FP8_KERNELS.get(k.dtype) if fp8 else "write_kv"
    k_stride, v_stride = _vec_layout(k), _vec_layout(v)
    if (
        kernel is None
        or v.dtype != k.dtype
        or k_stride is None
        or v_stride is None
        or not kv_cache.is_contiguous()
        or kv_cache.data_ptr() % 16
        or slot_mapping.dtype != torch.int64
        or not slot_mapping.is_contiguous()
    ):
        write_kv_ref(k, v, kv_cache, slot_mapping, k_scale, v_scale)
        return
    # 16-byte source vectors per row; a cache row holds as many units (FP8: 8 bytes each).
    row_vecs = k.shape[1] * k.shape[2] * k.element_size() // 16
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    threads = min(256, (row_vecs + 31) // 32 * 32)
    inv_scales = (np.float32(1.0 / k_scale), np.float32(1.0 / v_scale)) if fp8 else ()
    compiler.launch(
        compiler.load_module(SOURCE, name="write_kv").kernel(kernel),
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
        *inv_scales,
    )
