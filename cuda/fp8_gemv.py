"""FP8-weight GEMV for decode-sized batches (W8A16): y = (x @ wq^T) * w_scale (+ bias).

    x [M, K] bf16/fp16 (M <= 4), wq [N, K] float8_e4m3fn, w_scale [N] fp32 -> y [M, N]

At batch 1-4 a decode step is a weight read: this kernel streams each weight row once with
16-byte loads (16 FP8 values per lane), widens to fp32 and multiplies by the activations
as they are (no activation quantization, so no extra launch and no rounding of x),
accumulating in fp32. One warp per output row pair, 8 warps per block; x rows are re-read
from L1. `fp8_gemv_ref` is the torch reference.
"""

from __future__ import annotations

import numpy as np
import torch

from cuda import compiler

FP8 = torch.float8_e4m3fn
MAX_ROWS = 4  # largest M the kernel takes
ROWS_PER_WARP = 2
WARPS = 8

SOURCE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#ifndef HR_BF16
#define HR_BF16 1
#endif
#if HR_BF16
typedef __nv_bfloat16 elem_t;
typedef __nv_bfloat162 elem2_t;
__device__ __forceinline__ float2 to_f2(elem2_t v) { return __bfloat1622float2(v); }
__device__ __forceinline__ elem_t from_f(float a) { return __float2bfloat16(a); }
__device__ __forceinline__ float to_f(elem_t a) { return __bfloat162float(a); }
#else
typedef __half elem_t;
typedef __half2 elem2_t;
__device__ __forceinline__ float2 to_f2(elem2_t v) { return __half22float2(v); }
__device__ __forceinline__ elem_t from_f(float a) { return __float2half(a); }
__device__ __forceinline__ float to_f(elem_t a) { return __half2float(a); }
#endif

constexpr int WARPS = 8;
constexpr int RPW = 2;  // output rows per warp

__device__ __forceinline__ float2 fp8x2_to_f2(unsigned short v) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(v, __NV_E4M3);
    return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// 16 FP8 weights (one uint4) dotted with 16 activations x[0..15] (two uint4), added to acc.
__device__ __forceinline__ float dot16(const uint4& w, const uint4& xa, const uint4& xb,
                                       float acc) {
    const unsigned ws[4] = {w.x, w.y, w.z, w.w};
    const elem2_t* pa = reinterpret_cast<const elem2_t*>(&xa);
    const elem2_t* pb = reinterpret_cast<const elem2_t*>(&xb);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 w01 = fp8x2_to_f2(static_cast<unsigned short>(ws[i] & 0xffffu));
        const float2 w23 = fp8x2_to_f2(static_cast<unsigned short>(ws[i] >> 16));
        const float2 x01 = to_f2(i < 2 ? pa[2 * i] : pb[2 * i - 4]);
        const float2 x23 = to_f2(i < 2 ? pa[2 * i + 1] : pb[2 * i - 3]);
        acc = fmaf(w01.x, x01.x, acc);
        acc = fmaf(w01.y, x01.y, acc);
        acc = fmaf(w23.x, x23.x, acc);
        acc = fmaf(w23.y, x23.y, acc);
    }
    return acc;
}

// Grid (ceil(N / (WARPS * RPW))), WARPS * 32 threads. K % 16 == 0; rows 16-byte aligned.
template <int M>
__device__ __forceinline__ void gemv_impl(const elem_t* __restrict__ x, long long x_stride,
                                          const unsigned char* __restrict__ w,
                                          const float* __restrict__ w_scale,
                                          const elem_t* __restrict__ bias,
                                          elem_t* __restrict__ y, long long y_stride, int N,
                                          int K) {
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int n0 = (blockIdx.x * WARPS + warp) * RPW;
    if (n0 >= N) return;
    float acc[RPW][M];
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    const uint4* wrow[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int n = min(n0 + r, N - 1);  // a missing last row re-reads its neighbour
        wrow[r] = reinterpret_cast<const uint4*>(w + (long long)n * K);
    }
    const int chunks = K / 16;
#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
        uint4 wv[RPW];
#pragma unroll
        for (int r = 0; r < RPW; ++r) wv[r] = __ldg(wrow[r] + c);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const uint4* xr = reinterpret_cast<const uint4*>(x + m * x_stride) + 2 * c;
            const uint4 xa = __ldg(xr);
            const uint4 xb = __ldg(xr + 1);
#pragma unroll
            for (int r = 0; r < RPW; ++r) acc[r][m] = dot16(wv[r], xa, xb, acc[r][m]);
        }
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
                acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], off);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            const int n = n0 + r;
            if (n >= N) break;
            const float s = w_scale[n];
            const float b = bias != nullptr ? to_f(bias[n]) : 0.f;
#pragma unroll
            for (int m = 0; m < M; ++m) y[m * y_stride + n] = from_f(fmaf(acc[r][m], s, b));
        }
    }
}

#define HR_GEMV_ARGS                                                                         \
    const elem_t *__restrict__ x, long long x_stride, const unsigned char *__restrict__ w,  \
        const float *__restrict__ w_scale, const elem_t *__restrict__ bias,                 \
        elem_t *__restrict__ y, long long y_stride, int N, int K
#define HR_GEMV_PASS x, x_stride, w, w_scale, bias, y, y_stride, N, K
extern "C" __global__ void __launch_bounds__(WARPS * 32) fp8_gemv_m1(HR_GEMV_ARGS) {
    gemv_impl<1>(HR_GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(WARPS * 32) fp8_gemv_m2(HR_GEMV_ARGS) {
    gemv_impl<2>(HR_GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(WARPS * 32) fp8_gemv_m3(HR_GEMV_ARGS) {
    gemv_impl<3>(HR_GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(WARPS * 32) fp8_gemv_m4(HR_GEMV_ARGS) {
    gemv_impl<4>(HR_GEMV_PASS);
}
"""

IN_DTYPES = {torch.bfloat16: 1, torch.float16: 0}


def fp8_gemv_ref(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] fp8
    weight_scale: torch.Tensor,  # [N] fp32
    bias: torch.Tensor | None,  # [N]
) -> torch.Tensor:
    y = (x.float() @ weight.float().t()) * weight_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gemv_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Shapes and layouts the kernel takes."""
    m, k = x.shape
    return (
        x.is_cuda
        and 1 <= m <= MAX_ROWS
        and x.dtype in IN_DTYPES
        and k % 16 == 0
        and x.stride(1) == 1
        and (x.stride(0) * x.element_size()) % 16 == 0
        and x.data_ptr() % 16 == 0
        and weight.is_contiguous()
        and weight.data_ptr() % 16 == 0
    )


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,  # [M, N], x's dtype
) -> torch.Tensor:
    """The kernel on tensors it takes (see gemv_ok), else the reference."""
    if not gemv_ok(x, weight):
        y = fp8_gemv_ref(x, weight, weight_scale, bias)
        if out is not None:
            out.copy_(y)
            return out
        return y
    m, k = x.shape
    n = weight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    kernel = compiler.load_module(
        SOURCE, defines={"HR_BF16": IN_DTYPES[x.dtype]}, name="fp8_gemv"
    ).kernel(f"fp8_gemv_m{m}")
    compiler.launch(
        kernel,
        (-(-n // (WARPS * ROWS_PER_WARP)),),
        WARPS * 32,
        x.data_ptr(),
        np.int64(x.stride(0)),
        weight.data_ptr(),
        weight_scale.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        np.int64(out.stride(0)),
        np.int32(n),
        np.int32(k),
    )
    return out
