// SiLU-and-mul with the FP8 per-token activation quantization fused in (the FP8 down_proj's
// input at batches the GEMM path takes):
//
//   gate_up [T, 2I] bf16/fp16 (gate | up, row stride x_stride) ->
//   hq [T, I] float8_e4m3fn, scales [T] fp32, with h = round(round(silu(gate)) * up)
//   (fused_ops.cu silu_and_mul's roundings) and hq = sat(h / scale), scale = max|h| / 448
//   floored at min_scale (cuda/fp8_quant.py's), or the static scale when given.
//
// Unfused, h [T, I] in 16 bits is written by silu_and_mul and read back by the quant kernel:
// 4 bytes per element of extra DRAM traffic and one launch. Here one block owns a row: pass 1
// computes h for the amax, pass 2 recomputes it (the row's gate_up, 4 I bytes, is re-read
// from L2) and writes hq. Grid (T), THREADS threads; I % 8 == 0, rows 16-byte aligned.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#ifndef HR_BF16
#define HR_BF16 1
#endif
#if HR_BF16
typedef __nv_bfloat16 elem_t;
__device__ __forceinline__ float to_f(elem_t v) { return __bfloat162float(v); }
__device__ __forceinline__ elem_t from_f(float v) { return __float2bfloat16_rn(v); }
#else
typedef __half elem_t;
__device__ __forceinline__ float to_f(elem_t v) { return __half2float(v); }
__device__ __forceinline__ elem_t from_f(float v) { return __float2half_rn(v); }
#endif

namespace hr_fp8_fused {

constexpr int THREADS = 256;
constexpr float FP8_MAX = 448.f;

struct alignas(16) Vec8 {
    elem_t v[8];
};

// h for 8 elements (8 gate, 8 up), as silu_and_mul rounds it.
__device__ __forceinline__ void silu_mul8(const Vec8& g, const Vec8& u, float* h) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const float gf = to_f(g.v[e]);
        const float s = to_f(from_f(gf / (1.0f + expf(-gf))));
        h[e] = to_f(from_f(__fmul_rn(s, to_f(u.v[e]))));
    }
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float warp_max[THREADS / 32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = v;
    __syncthreads();
    v = warp_max[0];
#pragma unroll
    for (int w = 1; w < THREADS / 32; ++w) v = fmaxf(v, warp_max[w]);
    return v;
}

}  // namespace hr_fp8_fused

// units = I / 8. static_scale: null for dynamic per-token scales.
extern "C" __global__ void __launch_bounds__(hr_fp8_fused::THREADS)
    silu_mul_quant_fp8(const elem_t* __restrict__ x, long long x_stride,
                       uint2* __restrict__ hq, float* __restrict__ scales,
                       const float* __restrict__ static_scale, int units, float min_scale) {
    using namespace hr_fp8_fused;
    const long long t = blockIdx.x;
    const Vec8* gate = reinterpret_cast<const Vec8*>(x + t * x_stride);
    const Vec8* up = gate + units;
    float scale;
    if (static_scale != nullptr) {
        scale = *static_scale;
    } else {
        float amax = 0.f;
        for (int j = threadIdx.x; j < units; j += THREADS) {
            float h[8];
            silu_mul8(gate[j], up[j], h);
#pragma unroll
            for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(h[e]));
        }
        scale = fmaxf(block_max(amax) / FP8_MAX, min_scale);
    }
    if (threadIdx.x == 0) scales[t] = scale;
    uint2* out = hq + t * units;
    for (int j = threadIdx.x; j < units; j += THREADS) {
        float h[8];
        silu_mul8(gate[j], up[j], h);
        unsigned short q[4];
#pragma unroll
        for (int p = 0; p < 4; ++p)
            q[p] = __nv_cvt_float2_to_fp8x2(
                make_float2(__fdiv_rn(h[2 * p], scale), __fdiv_rn(h[2 * p + 1], scale)),
                __NV_SATFINITE, __NV_E4M3);
        out[j] = make_uint2(q[0] | ((unsigned)q[1] << 16), q[2] | ((unsigned)q[3] << 16));
    }
}
