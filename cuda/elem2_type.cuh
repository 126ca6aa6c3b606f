// The 16-bit element type of a weight-only GEMV module (int4_gemm.cu, int4_gemv.cu,
// fp8_gemv.cu) and its fp32 conversions, single and paired. cuda/compiler.py `read_source` pastes this file in place of its
// #include line, so a change here changes every including module's cubin cache key.
//
// Macro set per compiled module: HR_BF16 (1: __nv_bfloat16, 0: __half).

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef HR_BF16
#define HR_BF16 1
#endif

#if HR_BF16
typedef __nv_bfloat16 elem_t;
typedef __nv_bfloat162 elem2_t;
__device__ __forceinline__ float2 to_f2(elem2_t v) { return __bfloat1622float2(v); }
__device__ __forceinline__ elem_t from_f(float a) { return __float2bfloat16_rn(a); }
__device__ __forceinline__ float to_f(elem_t a) { return __bfloat162float(a); }
#else
typedef __half elem_t;
typedef __half2 elem2_t;
__device__ __forceinline__ float2 to_f2(elem2_t v) { return __half22float2(v); }
__device__ __forceinline__ elem_t from_f(float a) { return __float2half_rn(a); }
__device__ __forceinline__ float to_f(elem_t a) { return __half2float(a); }
#endif
