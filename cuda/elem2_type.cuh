// The 16-bit element type of a module that works on pairs (int4_gemm.cu, int4_gemv.cu,
// fp8_gemv.cu, prefill_attention_v2.cu), its fp32 conversions, single and paired, and the
// mma.sync type name (HR_MMA_TYPE). cuda/compiler.py `read_source` pastes this file in place of its
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
__device__ __forceinline__ elem2_t from_f2(float a, float b) { return __floats2bfloat162_rn(a, b); }
#define HR_MMA_TYPE "bf16"
#else
typedef __half elem_t;
typedef __half2 elem2_t;
__device__ __forceinline__ float2 to_f2(elem2_t v) { return __half22float2(v); }
__device__ __forceinline__ elem_t from_f(float a) { return __float2half_rn(a); }
__device__ __forceinline__ float to_f(elem_t a) { return __half2float(a); }
__device__ __forceinline__ elem2_t from_f2(float a, float b) { return __floats2half2_rn(a, b); }
#define HR_MMA_TYPE "f16"
#endif
