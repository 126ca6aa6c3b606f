// The tensor-core W4A16 pieces shared by int4_mma_gemv.cu (round 3, the rows layout) and
// int4_v4_gemv.cu (round 4, the stream layout): the mma.m16n8k16 and FMA2 of the activation
// dtype, the zero-point constants, the streaming load, the L2 prefetch, cp.async's group
// fences and the skinny GEMM's K-split sum. Each module keeps its own dequantization (the
// layouts put different nibbles in a word) and its magic constants (MW_*, V4_*): NVRTC
// emits every namespace-scope constexpr as a named symbol of the cubin, so moving them here
// would rename symbols of both modules' cubins. Pasted by cuda/compiler.py `read_source`;
// HR_BF16 picks the activation dtype.

#pragma once

#include "elem2_type.cuh"  // elem_t, from_f for HR_BF16

#if HR_BF16
#define I4_MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
#define I4_FMA2 "fma.rn.bf16x2"
#else
#define I4_MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
#define I4_FMA2 "fma.rn.f16x2"
#endif

// 16 bytes of weights, read once: L1 bypassed, a 256-byte L2 fetch.
__device__ __forceinline__ uint4 i4_ld_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Into L2 only: holds no registers.
__device__ __forceinline__ void i4_prefetch(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

__device__ __forceinline__ void i4_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void i4_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ unsigned int i4_fma2(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int d;
    asm(I4_FMA2 " %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// The constants that make (magic | nibbles) q - z for a zero point z (0..16), on both
// 16-bit lanes, as integer bit patterns (one IMAD each, no float conversions): lo for
// nibbles at bits 0-3 of each half, -(magic + z): bf16 -(128 + z) = 0xC300 + z, fp16
// -(1024 + z) = 0xE400 + z (both step 1 there); hi (fp16) for bits 4-7, -(magic / 16 + z):
// -(64 + z) = 0xD400 + 16 z (fp16 steps 1/16 in [64, 128)).
struct I4Zero {
    unsigned int lo, hi;
};

__device__ __forceinline__ I4Zero i4_zero(unsigned int z) {
#if HR_BF16
    return {0xC300C300u + z * 0x00010001u, 0u};
#else
    return {0xE400E400u + z * 0x00010001u, 0xD400D400u + z * 0x00100010u};
#endif
}

__device__ __forceinline__ void i4_mma(float (&d)[4], unsigned int a0, unsigned int a1, unsigned int a2,
                                       unsigned int a3, unsigned int b0, unsigned int b1) {
    asm volatile(I4_MMA " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned int i4_word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The skinny GEMM's end: the WK K-slices' sums acc[NT][4] (C fragments, 8 rows of x each)
// of tile tw are added in a fixed order through shared memory red [WK][TW][NT][4][32] (no
// atomics, no workspace: deterministic and graph-safe). Every slice puts its sums, then,
// after a barrier, slice 0 adds the others' (the caller keeps the barrier and the return
// of slices 1.., so that its control flow stays its own).
template <int TW, int NT>
__device__ __forceinline__ void i4_skinny_put(const float (&acc)[NT][4], float* red, int ks, int tw, int lane) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j) red[(((ks * TW + tw) * NT + nt) * 4 + j) * 32 + lane] = acc[nt][j];
}

template <int TW, int WK, int NT>
__device__ __forceinline__ void i4_skinny_add(float (&acc)[NT][4], const float* red, int tw, int lane) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float v = acc[nt][j];
#pragma unroll
            for (int s = 1; s < WK; ++s) v += red[(((s * TW + tw) * NT + nt) * 4 + j) * 32 + lane];
            acc[nt][j] = v;
        }
}
