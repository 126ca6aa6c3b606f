// The add + RMSNorm row math shared by fused_ops.cu add_rms_norm_{vec,scalar} and
// norm_quant.cu add_rms_norm_quant_fp8 (which must give bit-identical normed rows: the same
// per-thread order of the sum of squares, the same block reduction, the same roundings).
// Pasted by cuda/compiler.py `read_source`; needs elem_type.cuh first (elem_t, to_f, from_f).
//
// A row is `units` vectors of N elements; thread i owns vectors i, i + blockDim.x, ...
//   Pass 1 (rms_norm_rstd): h = round(x + residual), stored as the new residual; fp32 sum of
//   h^2; block reduction; rstd = rsqrt(sum / H + eps).
//   Pass 2 (rms_norm_unit, per vector): out = round(weight * round(h * rstd)), h re-read by
//   the thread that wrote it (so no barrier is needed).

#pragma once

#include "elem_type.cuh"

constexpr int VEC = 16 / sizeof(elem_t);  // elements per 16-byte vector

template <int N>
struct alignas(sizeof(elem_t) * N) Vec {
    elem_t v[N];
};

// Sum over the block; every thread gets the total. blockDim.x is a multiple of 32. Called
// once per kernel, so the shared array needs no second barrier.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Pass 1 of row blockIdx.x. residual and res_out are null together; res_out rows are dense.
template <int N>
__device__ __forceinline__ float rms_norm_rstd(
    const elem_t* __restrict__ x, long long x_stride, const elem_t* __restrict__ residual,
    long long r_stride, elem_t* __restrict__ res_out, int units, float eps) {
    typedef Vec<N> vec_t;
    const long long t = blockIdx.x;
    const vec_t* xr = reinterpret_cast<const vec_t*>(x + t * x_stride);
    const bool has_res = residual != nullptr;
    const vec_t* rr = has_res ? reinterpret_cast<const vec_t*>(residual + t * r_stride) : nullptr;
    vec_t* ro = has_res ? reinterpret_cast<vec_t*>(res_out + t * (long long)units * N) : nullptr;

    float ss = 0.0f;
    for (int j = threadIdx.x; j < units; j += blockDim.x) {
        vec_t h = xr[j];
        if (has_res) {
            const vec_t r = rr[j];
#pragma unroll
            for (int e = 0; e < N; ++e) h.v[e] = from_f(__fadd_rn(to_f(h.v[e]), to_f(r.v[e])));
            ro[j] = h;
        }
#pragma unroll
        for (int e = 0; e < N; ++e) {
            const float f = to_f(h.v[e]);
            ss = fmaf(f, f, ss);
        }
    }
    const float total = block_sum(ss);
    return rsqrtf(__fadd_rn(__fmul_rn(total, 1.0f / (float)(units * N)), eps));
}

// Pass 2 of one vector: round(w * round(h * rstd)).
template <int N>
__device__ __forceinline__ Vec<N> rms_norm_unit(const Vec<N>& h, const Vec<N>& w, float rstd) {
    Vec<N> o;
#pragma unroll
    for (int e = 0; e < N; ++e) {
        const float n = to_f(from_f(__fmul_rn(to_f(h.v[e]), rstd)));
        o.v[e] = from_f(__fmul_rn(to_f(w.v[e]), n));
    }
    return o;
}
