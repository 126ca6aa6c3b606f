// The tensor-core decode kernel's shared-memory stage layout and its copies
// (cuda/decode_attention.cu includes it after D, TILE and smem_u32; cuda/compiler.py
// `read_source` pastes it). tests/test_decode_fragments.py models it lane by lane.

#pragma once

// 16 bytes global -> shared, bypassing L1; zero-filled (nothing read) when !pred.
__device__ __forceinline__ void copy16(void* smem, const void* gmem, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
                 "l"(gmem), "r"(pred ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void copy16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem)
                 : "memory");
}

// The XOR applied to the 16-byte unit index of token t's row (t = 0..15 within a tile),
// masked to the row's units. Reads of one 8-lane phase then fall on distinct banks: K's
// (tokens 2j, 2j + 1, units 4p + q) through bit 0 of t, V's (tokens 2q + e, units 8c + n)
// through bits 1-2.
__device__ __forceinline__ int swz(int t) { return (((t >> 1) & 3) << 1) ^ ((t & 1) << 2); }

// Byte offset in a stage's K (or V) half of 8-element vector `vec` of token t's row, for a
// KV element of KB bytes (D * KB bytes per row, in 16-byte units).
template <int KB>
__device__ __forceinline__ int smem_off(int t, int vec) {
    constexpr int RB = D * KB, U = RB / 16;
    const int vb = vec * 8 * KB;  // the vector's byte offset in the row
    return t * RB + ((((vb >> 4) ^ (swz(t) & (U - 1)))) << 4) + (vb & 15);
}

// Shared memory of one warp's stage: a tile's K rows then its V rows, KB bytes an element.
template <int KB>
struct Stage {
    static constexpr int RB = D * KB;        // bytes of one token's row (one head)
    static constexpr int U = RB / 16;        // its 16-byte units
    static constexpr int TPI = 32 / U;       // tokens per warp-wide copy instruction
    static constexpr int CPY = TILE / TPI;   // copy instructions per tile, for K (and V)
    static constexpr int HALF = TILE * RB;   // bytes of the tile's K (and of its V)
    static constexpr int BYTES = 2 * HALF;
    static_assert(U >= 4 && U <= 32 && (U & (U - 1)) == 0, "4..32 units a row");
};

// The byte XOR of copy instruction i's swizzle beyond the lane's own: swz(TPI * i), masked.
template <typename St>
__device__ __forceinline__ int copy_xor(int i) {
    return (swz(St::TPI * i) & (St::U - 1)) << 4;
}

// Fragment reads: K of token 8h + n, vector 4p + q, is smem_off(n, q) (kl) with the vector's
// p part XORed into the unit field and 8h rows added; V of token 2q + (u & 1) + 8 (u >> 1),
// vector 8c + n, is smem_off(2q, n) (vl) likewise (swz is linear in t; the fields are
// disjoint bits). tests/test_decode_fragments.py checks both against smem_off.
template <typename St>
__device__ __forceinline__ int k_read_off(int kl, int h, int p) {
    constexpr int KB = St::RB / D;
    return 8 * h * St::RB + (kl ^ (32 * KB * p));
}
template <typename St>
__device__ __forceinline__ int v_read_off(int vl, int u, int c) {
    constexpr int KB = St::RB / D;
    return ((u & 1) + 8 * (u >> 1)) * St::RB +
           (vl ^ (((swz(u & 1) & (St::U - 1)) << 4) ^ (64 * KB * c)));
}
