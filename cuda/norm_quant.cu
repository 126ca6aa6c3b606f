// Add + RMSNorm with the FP8 (e4m3) per-token quantization of its output fused in: the input
// of an FP8 q/k/v or gate/up projection on the _scaled_mm path (cuda/norm_quant.py,
// HEADRACE_FP8_NORM_QUANT=1).
//
//   x, residual [T, H] bf16/fp16 -> out [T, H] = weight * rmsnorm(x + residual) (16-bit),
//   res_out [T, H] = x + residual, xq [T, H] float8_e4m3fn, scales [T] fp32
//
// out and res_out are fused_ops.cu add_rms_norm_vec's, bit for bit: the same row passes
// (rms_norm.cuh), the same launch geometry (grid T, block = H / 8 vectors rounded up to a
// warp, <= 1024), so the same sum of squares. xq / scales are cuda/fp8_quant.py's
// quant_fp8_per_token applied to out, bit for bit: scale = max|out| / 448 floored at
// min_scale (or *static_scale), xq = satfinite_e4m3(out / scale), each quotient __fdiv_rn of
// the rounded 16-bit value (fmaxf's max is order-free over |values| >= 0, so the different
// per-thread order of the two kernels' amax does not matter).
//
// Pass 2 keeps the 16-bit out of the thread's first vector in registers (4 registers; every
// vector a thread owns where H <= 8 * blockDim, i.e. H <= 8192) and re-reads the thread's own
// later stores (H > 8192) after the block's max, then writes 8 e4m3 bytes a vector.
//
// Why faster, by counting bytes (Llama-3-8B, H = 4096, a W2 decode step of T = 880): the norm
// moves 8 H bytes a row (x, residual in; out, res_out out: 28.8 MB) and quant_fp8_per_token
// another 5 H (out read twice, the second time from L2, and H bytes of xq) in its own launch:
// 6.7 us in the H200 step profile, twice a layer here. The fused kernel adds H bytes a row to
// the norm (xq) and no re-read from DRAM: expected ~+1 us on the norm's ~8 us, so ~5.5 us saved
// per call, ~0.35 ms of a ~41 ms step (64 calls); at T = 8192 ~33 us per call (43.6 us quant).
// Per element, the added work is one fabsf/fmaxf and one IEEE division + conversion: ~12
// instructions, far under the memory time at ~1.4 elements a lane a microsecond.

#include <cuda_fp8.h>

#include "rms_norm.cuh"  // elem_t (HR_DTYPE), Vec, VEC, rms_norm_rstd, rms_norm_unit

#if HR_DTYPE == 0
#error "norm_quant.cu quantizes 16-bit rows (HR_DTYPE 1: fp16, 2: bf16)"
#endif

namespace hr_norm_quant {

constexpr float FP8_MAX = 448.f;
typedef Vec<VEC> vec_t;  // 8 elements, 16 bytes in, 8 bytes of e4m3 out

// The max over the block (v >= 0); every thread gets it. blockDim.x is a multiple of 32.
// Called once per kernel, after block_sum (its own shared array: no barrier between them).
__device__ __forceinline__ float block_max(float v) {
    __shared__ float warp_max[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31;
    if (lane == 0) warp_max[threadIdx.x >> 5] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? warp_max[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// 8 e4m3 bytes of o / scale, packed as quant_fp8_per_token packs them.
__device__ __forceinline__ uint2 quant8(const vec_t& o, float scale) {
    unsigned short q[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const float a = to_f(o.v[2 * p]);
        const float b = to_f(o.v[2 * p + 1]);
        q[p] = __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(a, scale), __fdiv_rn(b, scale)),
                                        __NV_SATFINITE, __NV_E4M3);
    }
    return make_uint2(q[0] | ((unsigned)q[1] << 16), q[2] | ((unsigned)q[3] << 16));
}

}  // namespace hr_norm_quant

// add_rms_norm_vec's arguments (units = H / 8), then the quantized rows: xq [T, units] of 8
// bytes, scales [T], static_scale null for per-token scales.
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_quant_fp8(
    const elem_t* __restrict__ x, long long x_stride, const elem_t* __restrict__ residual,
    long long r_stride, const elem_t* __restrict__ weight, elem_t* __restrict__ out,
    elem_t* __restrict__ res_out, int units, float eps, uint2* __restrict__ xq,
    float* __restrict__ scales, const float* __restrict__ static_scale, float min_scale) {
    using namespace hr_norm_quant;
    const float rstd = rms_norm_rstd<VEC>(x, x_stride, residual, r_stride, res_out, units, eps);
    const long long t = blockIdx.x;
    const bool has_res = residual != nullptr;
    const vec_t* xr = reinterpret_cast<const vec_t*>(x + t * x_stride);
    const vec_t* ro =
        has_res ? reinterpret_cast<const vec_t*>(res_out + t * (long long)units * VEC) : nullptr;
    const vec_t* wr = reinterpret_cast<const vec_t*>(weight);
    vec_t* orow = reinterpret_cast<vec_t*>(out + t * (long long)units * VEC);
    vec_t first;  // out of the thread's first vector, j = threadIdx.x
    float amax = 0.0f;
    for (int j = threadIdx.x; j < units; j += blockDim.x) {
        const vec_t h = has_res ? ro[j] : xr[j];
        const vec_t w = wr[j];
        const vec_t o = rms_norm_unit<VEC>(h, w, rstd);
        orow[j] = o;
        if (j == threadIdx.x) first = o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) amax = fmaxf(amax, fabsf(to_f(o.v[e])));
    }
    const float scale =
        static_scale != nullptr ? *static_scale : fmaxf(block_max(amax) / FP8_MAX, min_scale);
    if (threadIdx.x == 0) scales[t] = scale;
    uint2* qrow = xq + t * units;
    if ((int)threadIdx.x < units) qrow[threadIdx.x] = quant8(first, scale);
    // Rows past 8 * blockDim elements: the thread's own stores of out, re-read.
    for (int j = threadIdx.x + blockDim.x; j < units; j += blockDim.x)
        qrow[j] = quant8(orow[j], scale);
}
