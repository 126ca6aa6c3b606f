// The element type of a compiled module and its fp32 conversions, shared by the kernels
// that take fp32/fp16/bf16 tensors (fused_ops.cu, layer_ops.cu). cuda/compiler.py
// `read_source` pastes this file in place of its #include line, so a change here changes
// every including module's source text and with it the cubin cache key.
//
// Macro set per compiled module: HR_DTYPE (0: float, 1: __half, 2: __nv_bfloat16).
// from_f rounds to nearest even, as torch's casts do.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef HR_DTYPE
#define HR_DTYPE 2
#endif

#if HR_DTYPE == 0
typedef float elem_t;
__device__ __forceinline__ float to_f(elem_t v) { return v; }
__device__ __forceinline__ elem_t from_f(float v) { return v; }
#elif HR_DTYPE == 1
typedef __half elem_t;
__device__ __forceinline__ float to_f(elem_t v) { return __half2float(v); }
__device__ __forceinline__ elem_t from_f(float v) { return __float2half_rn(v); }
#else
typedef __nv_bfloat16 elem_t;
__device__ __forceinline__ float to_f(elem_t v) { return __bfloat162float(v); }
__device__ __forceinline__ elem_t from_f(float v) { return __float2bfloat16_rn(v); }
#endif
