// SiLU-and-mul with the FP8 per-token activation quantization fused in (the FP8 down_proj's
// input at batches the GEMM path takes):
//
//   gate_up [T, 2I] bf16/fp16 (gate | up, row stride x_stride) ->
//   hq [T, I] float8_e4m3fn, scales [T] fp32, with h = round(round(silu(gate)) * up)
//   (fused_ops.cu silu_and_mul's roundings) and hq = sat(h / scale), scale = max|h| / 448
//   floored at min_scale (cuda/fp8_quant.py's), or the static scale when given.
//
// Register path, silu_mul_quant_fp8_v<VPT> (cuda/fp8_fused.py `plan` picks VPT, G, R):
// a group of G threads owns a row (R rows, R groups, per block: small rows share a block),
// thread i of a group owns the units (8 gate + 8 up elements, 32 bytes) i, i + G, ...,
// i + (VPT - 1) G. It issues all 2 VPT 16-byte loads up front (VPT = 8: 256 bytes in flight
// per thread, a warp's k-th load 512 contiguous bytes), computes each h once and keeps it
// packed in the 16-bit dtype (exact: h is rounded to it; 8 values in 4 registers), reduces
// the amax over the group, then writes hq from those registers. Per element that is one
// expf, one IEEE division for silu and one for the quantization, against two, two and one
// in the two-pass kernel (which recomputed h); the rows' gate_up is read once, from DRAM.
//
// Why faster, by counting (Llama-3-8B decode step, T = 880, I = 14336): 63 MB of DRAM
// traffic (read 4 I, write I bytes a row) is ~18 us at 3.5 TB/s. Computing h once is ~47
// issued instructions an element (expf ~8, silu division ~10, quant division ~10,
// conversions, packing, bounds ~19): 12.6 M elements * 47 over 132 SMs * 128 lanes *
// 1.98 GHz = ~18 us, about the memory time, where the two-pass kernel's ~90 (~34 us of
// issue, plus a strided loop with one 32-byte load in flight per thread) measured 58.6 us. (ptxas's SASS, VPT = 8: ~47 issued an element, ~10 of them
// each division's fast path.) VPT = 8, G = 224 (8B), 448 (70B): 106 registers, 2 / 1
// row-blocks resident an SM, whose phases (load / compute / store) overlap across SMs.
// Expected on the H200: ~25 us at T = 880 (~2.5 TB/s), ~200 us at T = 8192, I = 14336.
//
// The division stays __fdiv_rn (h / scale, as the torch reference): a multiply by the
// reciprocal differs in the last bit of some quotients, which can move an e4m3 rounding.
// (ptxas does not share the divisor's reciprocal between the divisions by `scale`: each
// one is MUFU.RCP, 5 FFMA and FCHK.)
//
// Staged path, silu_mul_quant_fp8_staged (rows of 512 units or more, the model sizes): one
// block of STAGED_THREADS a row, h kept in shared memory instead of registers. The register
// path's 106 registers left 14 warps an SM, too few to hide its loads behind its ~47
// instructions an element: it ran at ~1.4 TB/s (44.8 us at 880 x 14336, BENCHMARKS
// session 8). Here a thread holds its current and next unit (~40 registers) and writes each
// h, packed, to its own shared slots (I * 2 bytes a row: 28 KiB at I = 14336), so four
// row-blocks (32 warps) stay resident an SM. Pass 2 reads the thread's own slots back (no
// barrier needed for them) and quantizes with the scale's reciprocal hoisted:
//   q = a * r, then twice q = fma(fma(-q, s, a), r, q),   r = RN(1 / s),
// which is RN(a / s) (Markstein's theorem: r correctly rounded, q within an ulp, no
// overflow; the dynamic scale bounds |a / s| by 448), the sign of a zero taken from a:
// the same bits as __fdiv_rn's ~10 instructions and check in 6. (A row holding inf or NaN gets NaN
// where the division gives 0; such rows have no finite quantization either.) The static
// scale, whose quotients can overflow, keeps __fdiv_rn.
//
// Two-pass fallback, silu_mul_quant_fp8 (rows longer than the register path holds): one
// block of THREADS threads a row, pass 1 computes h for the amax, pass 2 recomputes it (the
// row re-read from L2) and writes hq. I % 8 == 0, rows 16-byte aligned (both paths).

#include <cuda_fp8.h>

#include "elem2_type.cuh"  // elem_t, elem2_t and their fp32 conversions for HR_BF16

namespace hr_fp8_fused {

constexpr int THREADS = 256;
constexpr int STAGED_THREADS = 256;
constexpr float FP8_MAX = 448.f;

struct alignas(16) Vec8 {
    elem_t v[8];
};

// torch's silu: x / (1 + exp(-x)) in fp32 (IEEE division, accurate expf).
__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

// h for 8 elements (8 gate, 8 up), as silu_and_mul rounds it.
__device__ __forceinline__ void silu_mul8(const Vec8& g, const Vec8& u, float* h) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const float s = to_f(from_f(silu_f(to_f(g.v[e]))));
        h[e] = to_f(from_f(__fmul_rn(s, to_f(u.v[e]))));
    }
}

// The same h, packed: two elements a 32-bit word (the same roundings, two conversions an
// instruction). amax takes max |h| of the 8.
__device__ __forceinline__ uint4 silu_mul8_packed(const uint4& g4, const uint4& u4, float& amax) {
    const elem2_t* g = reinterpret_cast<const elem2_t*>(&g4);
    const elem2_t* u = reinterpret_cast<const elem2_t*>(&u4);
    uint4 out;
    unsigned* o = reinterpret_cast<unsigned*>(&out);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const float2 gf = to_f2(g[p]);
        const float2 s = to_f2(from_f2(silu_f(gf.x), silu_f(gf.y)));
        const float2 uf = to_f2(u[p]);
        const elem2_t h = from_f2(__fmul_rn(s.x, uf.x), __fmul_rn(s.y, uf.y));
        const float2 hf = to_f2(h);
        amax = fmaxf(amax, fmaxf(fabsf(hf.x), fabsf(hf.y)));
        o[p] = *reinterpret_cast<const unsigned*>(&h);
    }
    return out;
}

__device__ __forceinline__ unsigned short quant2(float a, float b, float scale) {
    return __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(a, scale), __fdiv_rn(b, scale)),
                                    __NV_SATFINITE, __NV_E4M3);
}

// 8 packed h -> 8 e4m3 bytes.
__device__ __forceinline__ uint2 quant8_packed(const uint4& h4, float scale) {
    const elem2_t* h = reinterpret_cast<const elem2_t*>(&h4);
    unsigned short q[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const float2 f = to_f2(h[p]);
        q[p] = quant2(f.x, f.y, scale);
    }
    return make_uint2(q[0] | ((unsigned)q[1] << 16), q[2] | ((unsigned)q[3] << 16));
}

// RN(a / s) for s > 0 and r = RN(1 / s), finite a with |a / s| far from overflow (the
// staged path's header). a * r can be 1.5 ulps off, past Markstein's premise (within an
// ulp), so a first correction brings it within an ulp and the second rounds it exactly.
__device__ __forceinline__ float div_by(float a, float s, float r) {
    float q = __fmul_rn(a, r);
    q = __fmaf_rn(__fmaf_rn(-q, s, a), r, q);
    q = __fmaf_rn(__fmaf_rn(-q, s, a), r, q);
    return copysignf(q, a);
}

// 8 packed h -> 8 e4m3 bytes, dividing through div_by.
__device__ __forceinline__ uint2 quant8_recip(const uint4& h4, float scale, float r) {
    const elem2_t* h = reinterpret_cast<const elem2_t*>(&h4);
    unsigned short q[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const float2 f = to_f2(h[p]);
        q[p] = __nv_cvt_float2_to_fp8x2(make_float2(div_by(f.x, scale, r), div_by(f.y, scale, r)),
                                        __NV_SATFINITE, __NV_E4M3);
    }
    return make_uint2(q[0] | ((unsigned)q[1] << 16), q[2] | ((unsigned)q[3] << 16));
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

// The max of v over each group of g threads (g a power of two <= 32, or a multiple of 32;
// groups are consecutive threads). Every thread of the block calls it.
__device__ __forceinline__ float group_max(float v, int g) {
    __shared__ float warp_max[32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        if (off < g) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (g <= 32) return v;
    const int warps = g / 32;
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = v;
    __syncthreads();
    const int first = threadIdx.x / g * warps;
    v = warp_max[first];
    for (int w = 1; w < warps; ++w) v = fmaxf(v, warp_max[first + w]);
    return v;
}

// Register path (see the header). Block = R * G threads, grid ceil(rows / R).
template <int VPT>
__device__ __forceinline__ void silu_quant_regs(const elem_t* __restrict__ x, long long x_stride,
                                                uint2* __restrict__ hq, float* __restrict__ scales,
                                                const float* __restrict__ static_scale, int rows,
                                                int units, int g, float min_scale) {
    const int lane = threadIdx.x % g;
    const long long t = (long long)blockIdx.x * (blockDim.x / g) + threadIdx.x / g;
    const bool row_ok = t < rows;
    const uint4* gate = reinterpret_cast<const uint4*>(x + (row_ok ? t : 0) * x_stride);
    const uint4* up = gate + units;
    uint4 gv[VPT], uv[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = lane + k * g;
        if (row_ok && j < units) {
            gv[k] = __ldcs(gate + j);  // read once: evict first, hq keeps the L2
            uv[k] = __ldcs(up + j);
        }
    }
    uint4 h[VPT];
    float amax = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = lane + k * g;
        h[k] = make_uint4(0u, 0u, 0u, 0u);
        if (row_ok && j < units) h[k] = silu_mul8_packed(gv[k], uv[k], amax);
    }
    float scale;
    if (static_scale != nullptr) {
        scale = *static_scale;
    } else {
        scale = fmaxf(group_max(amax, g) / FP8_MAX, min_scale);
    }
    if (!row_ok) return;
    if (lane == 0) scales[t] = scale;
    uint2* out = hq + t * units;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = lane + k * g;
        if (j < units) out[j] = quant8_packed(h[k], scale);
    }
}

}  // namespace hr_fp8_fused

// units = I / 8. static_scale: null for dynamic per-token scales. g threads a row.
#define HR_REGS_KERNEL(VPT, MAXT)                                                                  \
    extern "C" __global__ void __launch_bounds__(MAXT) silu_mul_quant_fp8_v##VPT(                  \
        const elem_t* __restrict__ x, long long x_stride, uint2* __restrict__ hq,                  \
        float* __restrict__ scales, const float* __restrict__ static_scale, int rows,              \
        int units, int g, float min_scale) {                                                       \
        hr_fp8_fused::silu_quant_regs<VPT>(x, x_stride, hq, scales, static_scale, rows,            \
                                           units, g, min_scale);                                   \
    }
// MAXT: the largest block the plan gives VPT (cuda/fp8_fused.py MAX_THREADS), which caps
// ptxas's registers at 65536 / MAXT.
HR_REGS_KERNEL(1, 1024)
HR_REGS_KERNEL(2, 1024)
HR_REGS_KERNEL(3, 1024)
HR_REGS_KERNEL(4, 512)
HR_REGS_KERNEL(5, 512)
HR_REGS_KERNEL(6, 512)
HR_REGS_KERNEL(7, 512)
HR_REGS_KERNEL(8, 512)

// The two-pass fallback: grid (T), THREADS threads. units = I / 8.
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
        for (int p = 0; p < 4; ++p) q[p] = quant2(h[2 * p], h[2 * p + 1], scale);
        out[j] = make_uint2(q[0] | ((unsigned)q[1] << 16), q[2] | ((unsigned)q[3] << 16));
    }
}

// The staged path (see the header): grid (T), STAGED_THREADS threads, units * 16 bytes of
// dynamic shared memory. units = I / 8.
extern "C" __global__ void __launch_bounds__(hr_fp8_fused::STAGED_THREADS, 4)
    silu_mul_quant_fp8_staged(const elem_t* __restrict__ x, long long x_stride,
                              uint2* __restrict__ hq, float* __restrict__ scales,
                              const float* __restrict__ static_scale, int units,
                              float min_scale) {
    using namespace hr_fp8_fused;
    extern __shared__ uint4 h_row[];  // [units]: thread i's slots i, i + STAGED_THREADS, ...
    const long long t = blockIdx.x;
    const uint4* gate = reinterpret_cast<const uint4*>(x + t * x_stride);
    const uint4* up = gate + units;
    float amax = 0.f;
    int j = threadIdx.x;
    uint4 g0 = make_uint4(0u, 0u, 0u, 0u), u0 = g0;
    if (j < units) {
        g0 = __ldcs(gate + j);  // read once: evict first, hq keeps the L2
        u0 = __ldcs(up + j);
    }
    for (; j < units; j += STAGED_THREADS) {
        // the next unit's loads go out before this one's math
        const int n = j + STAGED_THREADS;
        uint4 g1 = make_uint4(0u, 0u, 0u, 0u), u1 = g1;
        if (n < units) {
            g1 = __ldcs(gate + n);
            u1 = __ldcs(up + n);
        }
        h_row[j] = silu_mul8_packed(g0, u0, amax);
        g0 = g1;
        u0 = u1;
    }
    uint2* out = hq + t * units;
    if (static_scale != nullptr) {
        const float scale = *static_scale;
        if (threadIdx.x == 0) scales[t] = scale;
        for (j = threadIdx.x; j < units; j += STAGED_THREADS) out[j] = quant8_packed(h_row[j], scale);
        return;
    }
    const float scale = fmaxf(block_max(amax) / FP8_MAX, min_scale);
    if (threadIdx.x == 0) scales[t] = scale;
    const float r = __frcp_rn(scale);
    for (j = threadIdx.x; j < units; j += STAGED_THREADS) out[j] = quant8_recip(h_row[j], scale, r);
}
