"""FP8-weight GEMV for decode-sized batches (W8A16): y = (x @ wq^T) * w_scale (+ bias).

    x [M, K] bf16/fp16 (M <= 8), wq [N, K] float8_e4m3fn, w_scale [N] or [1] fp32 -> y [M, N]

At batch 1-8 a decode step is a weight read, so no activation quantization (no extra
launch, no rounding of x): weights widen to fp32 in registers, fp32 accumulate.
HEADRACE_FP8_GEMV picks the kernel:
- `new` (default): cuda/fp8_gemv.cu, M <= 8; a block of 128 threads owns 4 rows (8 at
  M > 4), 16-byte L1-bypassing weight loads, every load of a round issued first;
- `old`: the first kernel (SOURCE below), M <= 4: one warp per row pair, 8 warps a block;
- `0`: no GEMV: every batch runs torch._scaled_mm after activation quantization.
`fp8_gemv_ref` is the torch reference; `plan` is the launch math (CPU-tested).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cuda import compiler

FP8 = torch.float8_e4m3fn
MODES = ("new", "old", "0")
MAX_ROWS = {"new": 8, "old": 4, "0": 0}  # largest M each kernel takes
ROWS_PER_WARP = 2  # old kernel
WARPS = 8  # old kernel
THREADS = 128  # new kernel (fp8_gemv.cu THREADS)
V2_PATH = Path(__file__).with_name("fp8_gemv.cu")


def gemv_mode(value: str | None = None) -> str:
    """HEADRACE_FP8_GEMV, validated: new (default; also 1), old, or 0 (off)."""
    raw = os.environ.get("HEADRACE_FP8_GEMV", "new") if value is None else value
    mode = {"1": "new", "off": "0"}.get(raw.strip().lower(), raw.strip().lower())
    if mode not in MODES:
        raise ValueError(f"HEADRACE_FP8_GEMV must be one of new, old, 0; got {raw!r}")
    return mode


MODE = gemv_mode()

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
    weight_scale: torch.Tensor,  # [N] or [1] / [] fp32
    bias: torch.Tensor | None,  # [N]
) -> torch.Tensor:
    s = weight_scale.float().reshape(-1)
    y = (x.float() @ weight.float().t()) * s
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@dataclass(frozen=True)
class Plan:
    """One launch: kernel name, grid, threads, rows per block, unroll (new kernel)."""

    kernel: str
    grid: int
    threads: int
    rows: int
    unroll: int


def tile(m: int) -> tuple[int, int]:
    """(rows per block, unroll) of the new kernel at batch m (fp8_gemv.cu Tile<M>)."""
    return (4, 2) if m <= 4 else (8, 1)


def plan(m: int, n: int, mode: str = "new") -> Plan:
    if mode == "old":
        rows = WARPS * ROWS_PER_WARP
        return Plan(f"fp8_gemv_m{m}", -(-n // rows), WARPS * 32, rows, 2)
    rows, unroll = tile(m)
    return Plan(f"fp8_gemv_v2_m{m}", -(-n // rows), THREADS, rows, unroll)


def gemv_ok(x: torch.Tensor, weight: torch.Tensor, mode: str | None = None) -> bool:
    """Shapes and layouts the kernel takes (mode None: HEADRACE_FP8_GEMV's)."""
    m, k = x.shape
    return (
        x.is_cuda
        and 1 <= m <= MAX_ROWS[MODE if mode is None else mode]
        and x.dtype in IN_DTYPES
        and k % 16 == 0
        and x.stride(1) == 1
        and (x.stride(0) * x.element_size()) % 16 == 0
        and x.data_ptr() % 16 == 0
        and weight.is_contiguous()
        and weight.data_ptr() % 16 == 0
    )


def source(mode: str) -> str:
    return compiler.read_source(V2_PATH) if mode == "new" else SOURCE


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,  # [M, N], x's dtype
    mode: str | None = None,  # new / old (None: HEADRACE_FP8_GEMV, "new" if that is 0)
) -> torch.Tensor:
    """The kernel on tensors it takes (see gemv_ok), else the reference."""
    mode = mode or (MODE if MODE != "0" else "new")
    if not gemv_ok(x, weight, mode):
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
    per_tensor = weight_scale.numel() == 1
    if mode == "old" and per_tensor:
        weight_scale = weight_scale.reshape(1).expand(n).contiguous()
    pl = plan(m, n, mode)
    mod = compiler.load_module(
        source(mode), defines={"HR_BF16": IN_DTYPES[x.dtype]}, name=f"fp8_gemv_{mode}"
    )
    scale_args: list[object] = [weight_scale.data_ptr()]
    if mode == "new":
        scale_args.append(np.int32(0 if per_tensor else 1))
    compiler.launch(
        mod.kernel(pl.kernel),
        (pl.grid,),
        pl.threads,
        x.data_ptr(),
        np.int64(x.stride(0)),
        weight.data_ptr(),
        *scale_args,
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        np.int64(out.stride(0)),
        np.int32(n),
        np.int32(k),
    )
    return out
