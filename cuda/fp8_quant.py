"""FP8 (e4m3) activation quantization: one scale per token (row), or a static scale.

    x [M, K] bf16/fp16  ->  xq [M, K] float8_e4m3fn,  scales [M, 1] fp32,  x ~= xq * scales

Dynamic: scales[m] = max(|x[m]|) / 448 (floored so an all-zero row divides by a tiny
number, not by zero). Static: every row uses the checkpoint's `input_scale`. Values are
rounded to nearest and saturated at +-448, as the CUDA kernel's SATFINITE conversion does.
`quantize_per_token_ref` is the torch reference; the kernel is one block per row.
"""

from __future__ import annotations

import numpy as np
import torch

from cuda import compiler

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # floor for an all-zero row (vLLM's choice, too)

SOURCE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#ifndef HR_BF16
#define HR_BF16 1
#endif
#if HR_BF16
typedef __nv_bfloat162 in2_t;
__device__ __forceinline__ float2 to_f2(in2_t v) { return __bfloat1622float2(v); }
#else
typedef __half2 in2_t;
__device__ __forceinline__ float2 to_f2(in2_t v) { return __half22float2(v); }
#endif

constexpr int THREADS = 256;
constexpr float FP8_MAX = 448.f;

// Grid (M), THREADS threads. Row m of x (K elements, K % 8 == 0, 16-byte aligned rows) ->
// xq row m (8 bytes per 8 elements) and scales[m]. static_scale: null for dynamic.
extern "C" __global__ void __launch_bounds__(THREADS) quant_fp8_per_token(
    const uint4* __restrict__ x, long long x_stride_vec, uint2* __restrict__ xq,
    float* __restrict__ scales, const float* __restrict__ static_scale, int k_vecs,
    float min_scale) {
    const long long m = blockIdx.x;
    const uint4* row = x + m * x_stride_vec;
    float scale;
    if (static_scale != nullptr) {
        scale = *static_scale;
    } else {
        float amax = 0.f;
        for (int i = threadIdx.x; i < k_vecs; i += THREADS) {
            const uint4 v = __ldg(row + i);
            const in2_t* p = reinterpret_cast<const in2_t*>(&v);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 f = to_f2(p[j]);
                amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
            }
        }
        __shared__ float warp_max[THREADS / 32];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
        __syncthreads();
        amax = warp_max[0];
#pragma unroll
        for (int w = 1; w < THREADS / 32; ++w) amax = fmaxf(amax, warp_max[w]);
        scale = fmaxf(amax / FP8_MAX, min_scale);
    }
    if (threadIdx.x == 0) scales[m] = scale;
    // x / scale, not x * (1 / scale): the same rounding as the torch reference (the kernel
    // is memory-bound, the division costs nothing measurable).
    uint2* out = xq + m * k_vecs;
    for (int i = threadIdx.x; i < k_vecs; i += THREADS) {
        const uint4 v = __ldg(row + i);
        const in2_t* p = reinterpret_cast<const in2_t*>(&v);
        unsigned short q[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 f = to_f2(p[j]);
            q[j] = __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(f.x, scale), __fdiv_rn(f.y, scale)), __NV_SATFINITE,
                                            __NV_E4M3);
        }
        out[i] = make_uint2(q[0] | ((unsigned)q[1] << 16), q[2] | ((unsigned)q[3] << 16));
    }
}
"""

IN_DTYPES = {torch.bfloat16: 1, torch.float16: 0}


def quantize_per_token_ref(
    x: torch.Tensor,  # [M, K]
    static_scale: torch.Tensor | None = None,  # [1] fp32: the checkpoint's input_scale
) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    if static_scale is None:
        scales = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scales = static_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    xq = (xf / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return xq, scales


def _kernel_ok(x: torch.Tensor) -> bool:
    k = x.shape[1]
    return (
        x.dtype in IN_DTYPES
        and k % 8 == 0
        and x.stride(1) == 1
        and (x.stride(0) * x.element_size()) % 16 == 0
        and x.data_ptr() % 16 == 0
    )


def quantize_per_token(
    x: torch.Tensor,  # [M, K]
    static_scale: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,  # (xq [M, K], scales [M, 1])
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA kernel on GPU tensors it can take (no host sync), else the reference."""
    if not x.is_cuda or not _kernel_ok(x):
        xq, scales = quantize_per_token_ref(x, static_scale)
        if out is not None:
            out[0].copy_(xq)
            out[1].copy_(scales)
            return out
        return xq, scales
    m, k = x.shape
    if out is None:
        out = (
            torch.empty((m, k), dtype=FP8, device=x.device),
            torch.empty((m, 1), dtype=torch.float32, device=x.device),
        )
    if m == 0:
        return out
    kernel = compiler.load_module(
        SOURCE, defines={"HR_BF16": IN_DTYPES[x.dtype]}, name="fp8_quant"
    ).kernel("quant_fp8_per_token")
    compiler.launch(
        kernel,
        (m,),
        256,
        x.data_ptr(),
        np.int64(x.stride(0) * x.element_size() // 16),
        out[0].data_ptr(),
        out[1].data_ptr(),
        0 if static_scale is None else static_scale.data_ptr(),
        np.int32(k // 8),
        np.float32(MIN_SCALE),
    )
    return out
