// W4A16 tiled GEMM on tensor cores for 33..512 rows of x (issue 14). tiled_gemm reads the rows
// layout as loaded (cuda/int4_gemm.cu draws it: qw uint32 [N, K / 8], nibble j of word w =
// input 8 w + j), tiled_gemm_stream the stream layout (cuda/int4_v4_gemv.cu draws it). A new
// module, so the measured GEMV / skinny cubins stay as they are; no new load-time layout.
//
// Why not the skinny kernel at 64+ rows: there a warp owns one 16-channel tile, so every B
// (x) fragment it reads from shared memory feeds one A tile (~256 B of x per mma), and the
// per-k-block exact partial sums t[] double the accumulators (178-198 registers). Here:
//
// Warp tile 32 channels x 64 rows: two 16 x 16 A tiles (dequantized in registers) x eight
// 16 x 8 B tiles (x rows), 32 mma a 16-input pair of k-steps; each B fragment (one 16-byte
// LDS) feeds 2 A tiles (128 B of x per mma), each A fragment feeds 8 B tiles. The scale is
// folded into A (A = round((q - z) s) in the activation dtype, which is what
// int4_linear_ref's dequantize rounds to), so there is one fp32 accumulator set,
// 2 x 8 x 4 = 64 registers, and on the rows layout any group size that is a multiple of 32
// works (a lane's 32 inputs of a k-block always lie in one group; stream: a vector's 64).
// fp16: (q - z) is exact, one FMA2 by the scale pair rounds once: equal to the reference's
// rounding. bf16: the fp16 scale is split s = hi + lo (hi = bf16(s), lo = s - hi has <= 3
// significant bits, exact in bf16), so lo (q - z) (<= 7 bits) is exact and
// fma(q - z, hi, lo (q - z)) rounds once: also equal (tests/test_int4_tiled.py checks every
// nibble x zero point bit for bit).
//
// Block: 8 warps along N (256 channels) x 64 rows (blockIdx.x = 64-row block, fastest, so
// the blocks that share a weight tile run together and its re-reads hit L2; y = 256-channel
// block; z = K split). Per 128-input k-block a stage holds the block's weights (256 x 64 B,
// cp.async, 16 KB) and x's rows (64 x 256 B, cp.async, 16 KB) in a TG_STAGES ring: no
// registers hold data in flight, so one block of 8 warps an SM (the ~220 registers the
// unrolled k-block takes; ~192 KB of shared memory) still keeps 2-3 stages (~64-96 KB an SM,
// ~8-12 MB on 132 SMs, over HBM's ~4 MB latency x bandwidth) of loads in flight. Of the block
// tile shapes with 8 warps of 32 x 64, 256 x 64 moves the fewest L2 -> SM bytes,
// N M K (0.5 / BM + 2 / BN) (x's element is 4x a weight's bytes): 0.0156 N M K against
// 0.0195 for 128 x 128. A block's live B tiles (ceil(rows / 8)) are a template argument
// (switch on a block-uniform count): per-tile branches made ptxas group each tile's 8 mma's
// behind its branch, 2 accumulator chains deep; unrolled, 2 x NTU chains interleave.
//
// Input map, rows layout (as cuda/int4_mma_gemv.cu): k-step 2 i + t (word i of a lane's
// 16-byte vector) maps mma column 2 c + h + 8 j to input 32 c + 8 i + 2 t + j + 4 h, so A's
// pairs are (nibble s, nibble s + 4) of a word (one LOP3 each) and B's pairs are
// (x_e, x_e+4) of the lane's 8 inputs. That permutation of x is made once a block, not once
// a warp: each thread PRMTs the x chunks it copied itself (its own cp.async group is visible
// to it after the wait, no barrier) into a second buffer, so a warp's B fragment for 2
// k-steps is one LDS.128 with no PRMT (the 8 warps would otherwise do 32 PRMT each a k-step
// pair). Swizzle of that buffer: chunk i of a row's run c at 4 c + (i ^ ((c >> 1) |
// (row & 1) << 1)), so a quarter-warp's 8 16-byte reads (rows g, g + 1 of a tile, c = 0..3)
// hit 8 bank groups. Stream layout: its map already pairs x as B wants (inputs 32 p + 8 c ..
// + 7 of a lane are k-steps 2 p, 2 p + 1's four B registers), so B is read from the staged x
// itself (odd rows' chunks moved by 4: again 8 bank groups), no permute pass; a stage copies
// the block's 16 units (1 KB each, contiguous), and A registers 1 and 3 are channel g + 8.
//
// Count (a warp, a k-step pair of its 32 x 64 tile, bf16; fp16 in brackets; SASS agrees:
// per k-block 128 HMMA, 64 each of HADD2 / HMUL2 / HFMA2, ~64 LOP3, ~48 SHF, 32 LDS x):
//   32 HMMA; 8 LDS.128 of x (one per B tile); 4 words dequantized: 4 x (3 SHF [1] + 4 LOP3 +
//   4 FMA2 (q - z) + 8 FMA2 (x s) [4]) = 76 [52]; weights 4 LDS.128 a k-block (1 a pair);
//   ~90 [~70] issue slots for 32 mma, plus ~140 a k-block (4 pairs) for the stage's
//   cp.async, the permute, scales and the barrier: ~3.9 [~3.3] issues per mma, under the
//   ~6 clocks an SMSP takes per m16n8k16 at mma.sync's ~2/3 of Hopper's dense rate.
//   Shared-memory reads: 128 B of x + 16 B of weights per mma (~90 B a clock an SM at
//   ~1 mma / 1.6 clocks: under the 128).
// Expected on 70B gate_up (57344 x 8192), by counting, until the H200 says otherwise:
//   M = 64: 224 blocks on 132 SMs (1 an SM): 2 waves (the second 70% full), each block
//   65536 mma = 16384 an SMSP at ~6-8 clocks: ~55-75 us a wave, ~110-150 us (today 602.6,
//   cuBLAS bf16 242.9; weight bytes ~60 us of HBM; L2 -> SM ~470 MB). M = 128: 448 blocks,
//   4 waves, ~220-300 us (619 / 259). M = 256: 896 blocks, 7 waves, ~390-520 us (685 / 316):
//   mma.sync's rate (and the dequant redone per 64-row block), not bytes, bounds it there;
//   the step past it is wgmma (sm_90a) with A, the dequantized weight, from registers.
//
// Split-K (grid.z > 1, the host's rule: only when the grid would leave SMs idle, e.g. 8B
// down's 16 channel blocks): each split writes fp32 partials to ws [S, M, N], and
// tiled_reduce sums them in split order (deterministic, no atomics, graph-safe).
// Rows past M: staged as row M - 1, their B tiles skipped (block-uniform), not written.
// Channels past N: read channel N - 1 (stream: the last tile), not written.

#include "elem2_type.cuh"  // elem_t, from_f for HR_BF16

constexpr int TG_KB = 128;     // inputs per k-block (one stage)
constexpr int TG_BN = 256;     // channels a block (8 warps x 32)
constexpr int TG_BM = 64;      // rows a block (8 B tiles of 8)
constexpr int TG_THREADS = 256;
#ifndef TG_STAGES
#define TG_STAGES 5            // ring depth (2 x 16 KB a stage + 32 KB of permuted x)
#endif
constexpr int TG_W_U4 = TG_BN * TG_KB / 32;  // uint4 of weights a stage: 1024
constexpr int TG_X_U4 = TG_BM * TG_KB / 8;   // uint4 of x a stage: 1024

#if HR_BF16
#define TG_MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
#define TG_FMA2 "fma.rn.bf16x2"
constexpr unsigned int TG_MAGIC = 0x43004300u;  // 128.0 pair
constexpr unsigned int TG_ONE = 0x3F803F80u;
#else
#define TG_MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
#define TG_FMA2 "fma.rn.f16x2"
constexpr unsigned int TG_MAGIC = 0x64006400u;  // 1024.0 pair
constexpr unsigned int TG_ONE = 0x3C003C00u;
constexpr unsigned int TG_SIXTEENTH = 0x2C002C00u;  // 1/16 pair
#endif
constexpr unsigned int TG_NEG0 = 0x80008000u;  // -0.0 pair: fma(a, b, -0) = a b exactly

__device__ __forceinline__ unsigned int tg_fma2(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int d;
    asm(TG_FMA2 " %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ void tg_cp16(uint4* smem, const void* gmem) {
    const unsigned int s = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void tg_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void tg_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void tg_mma(float (&d)[4], unsigned int a0, unsigned int a1, unsigned int a2,
                                       unsigned int a3, const uint4& b) {
    asm volatile(TG_MMA " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y));
}
__device__ __forceinline__ void tg_mma_hi(float (&d)[4], unsigned int a0, unsigned int a1, unsigned int a2,
                                          unsigned int a3, const uint4& b) {
    asm volatile(TG_MMA " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.z), "r"(b.w));
}

__device__ __forceinline__ unsigned int tg_word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One channel's dequantization constants for a k-block: the zero point's -(magic + z)
// patterns (as cuda/int4_mma_gemv.cu's mw_zero: one IMAD each) and the scale pair(s).
struct TgChan {
    unsigned int zlo, zhi, s_hi, s_lo;
};

__device__ __forceinline__ TgChan tg_chan(__half s, unsigned int z) {
    TgChan t;
#if HR_BF16
    t.zlo = 0xC300C300u + z * 0x00010001u;
    t.zhi = 0u;
    const float sf = __half2float(s);
    const __nv_bfloat16 hi = __float2bfloat16_rn(sf);
    const __nv_bfloat16 lo = __float2bfloat16_rn(sf - __bfloat162float(hi));  // exact (<= 3 bits)
    const unsigned int h = __bfloat16_as_ushort(hi), l = __bfloat16_as_ushort(lo);
    t.s_hi = h | (h << 16);
    t.s_lo = l | (l << 16);
#else
    t.zlo = 0xE400E400u + z * 0x00010001u;
    t.zhi = 0xD400D400u + z * 0x00100010u;
    const unsigned int h = __half_as_ushort(s);
    t.s_hi = h | (h << 16);
    t.s_lo = 0u;
#endif
    return t;
}

// q[s] = round((nibble s - z) scale, (nibble s + 4 - z) scale) of word w as a 16-bit pair.
// `lo` is 0x000F000F from a kernel argument (see mw_dequant: as a constant ptxas re-makes it).
__device__ __forceinline__ unsigned int tg_scale(unsigned int qz, const TgChan& t) {
#if HR_BF16
    return tg_fma2(qz, t.s_hi, tg_fma2(qz, t.s_lo, TG_NEG0));
#else
    return tg_fma2(qz, t.s_hi, TG_NEG0);
#endif
}

// q[s] = round((nibble s - z) scale, (nibble s + 4 - z) scale) of word w as a 16-bit pair;
// even s with channel constants tl, odd s with th (rows layout: the same channel; stream
// layout: A registers 1 and 3 are channel g + 8). `lo` is 0x000F000F from a kernel argument
// (see cuda/int4_mma_gemv.cu's mw_dequant: as a constant ptxas re-makes it before each LOP3).
__device__ __forceinline__ void tg_dequant2(unsigned int w, const TgChan& tl, const TgChan& th, unsigned int lo,
                                            unsigned int (&q)[4]) {
#if HR_BF16
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const TgChan& t = (s & 1) ? th : tl;
        q[s] = tg_scale(tg_fma2(((w >> (4 * s)) & lo) | TG_MAGIC, TG_ONE, t.zlo), t);
    }
#else
    const unsigned int w8 = w >> 8, hi = lo << 4;
    q[0] = tg_scale(tg_fma2((w & lo) | TG_MAGIC, TG_ONE, tl.zlo), tl);
    q[1] = tg_scale(tg_fma2((w & hi) | TG_MAGIC, TG_SIXTEENTH, th.zhi), th);
    q[2] = tg_scale(tg_fma2((w8 & lo) | TG_MAGIC, TG_ONE, tl.zlo), tl);
    q[3] = tg_scale(tg_fma2((w8 & hi) | TG_MAGIC, TG_SIXTEENTH, th.zhi), th);
#endif
}

// The permuted buffer's slot of (row, chunk ch = 4 c + i) (rows layout; swizzle: header).
__device__ __forceinline__ int tg_slot(int row, int ch) {
    const int c = ch >> 2, i = ch & 3;
    return row * 16 + 4 * c + (i ^ ((c >> 1) | ((row & 1) << 1)));
}

// The stream layout's x slot of (row, chunk ch): no permutation (its B pairs are x's own),
// chunks of odd rows moved by 4 (64 bytes) so that a quarter-warp's rows g, g + 1 (chunks
// 4 p + c, c = 0..3) hit 8 bank groups.
__device__ __forceinline__ int tg_sslot(int row, int ch) { return row * 16 + (ch ^ ((row & 1) << 2)); }

#define HR_TG_ARGS                                                                              \
    const elem_t *__restrict__ x, long long x_stride, const uint4 *__restrict__ qw,          \
        const __half *__restrict__ scales, const unsigned char *__restrict__ zeros,             \
        elem_t *__restrict__ y, long long y_stride, int N, int K, int group_size, int M,       \
        int per, float *__restrict__ ws, int lo_mask
#define HR_TG_PASS x, x_stride, qw, scales, zeros, y, y_stride, N, K, group_size, M, per, ws, lo_mask

// Stage k-block b's weights and x rows (rows 0 .. rows - 1 of this block) into ring slot
// `slot`, one commit group (empty when b is past the split: keeps wait_group's count).
// wstep: uint4 between a weight row pointer's k-blocks (rows layout 4, stream 64).
template <bool STREAM>
__device__ __forceinline__ void tg_stage(uint4* wsm, uint4* xsm, const uint4* const (&wrow)[4],
                                         const elem_t* const (&xrow)[4], int b, bool live, int rows) {
    if (live) {
        const int tid = threadIdx.x;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int q = tid + TG_THREADS * j;
            // rows: channel q >> 2, chunk q & 3; stream: tile q >> 6, uint4 q & 63 of its unit
            tg_cp16(wsm + q, wrow[j] + (STREAM ? 64 : 4) * b);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int q = tid + TG_THREADS * j, row = q >> 4;
            if (row < rows) tg_cp16(xsm + (STREAM ? tg_sslot(row, q & 15) : q), xrow[j] + b * TG_KB);
        }
    }
    tg_commit();
}

// This thread's x chunks of a landed stage, PRMT'd to (x_e, x_e+4) pairs, into `pbuf`.
__device__ __forceinline__ void tg_permute(const uint4* xsm, uint4* pbuf, int rows) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int q = tid + TG_THREADS * j, row = q >> 4;
        if (row < rows) {
            const uint4 v = xsm[q];
            uint4 p;
            p.x = __byte_perm(v.x, v.z, 0x5410);  // (x0, x4)
            p.y = __byte_perm(v.x, v.z, 0x7632);  // (x1, x5)
            p.z = __byte_perm(v.y, v.w, 0x5410);  // (x2, x6)
            p.w = __byte_perm(v.y, v.w, 0x7632);  // (x3, x7)
            pbuf[tg_slot(row, q & 15)] = p;
        }
    }
}

// The lane's scales and zeros for k-block b: rows layout, one group a channel (its inputs
// 32 c .. + 31: group (4 b + c) / (group_size / 32)); stream, one a channel and vector j
// (inputs 64 j .. + 63: group (2 b + j) / (group_size / 64)). Index e + 4 j.
template <bool STREAM>
__device__ __forceinline__ void tg_load_chan(const __half* __restrict__ scales, const unsigned char* __restrict__ zeros,
                                             const int (&chn)[4], int G, int b, int c, int group_size,
                                             __half (&s)[8], unsigned int (&z)[8]) {
#pragma unroll
    for (int j = 0; j < (STREAM ? 2 : 1); ++j) {
        const int gi = STREAM ? (2 * b + j) / (group_size / 64) : (4 * b + c) / (group_size / 32);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            s[e + 4 * j] = __ldg(scales + (long long)chn[e] * G + gi);
            z[e + 4 * j] = __ldg(zeros + (long long)chn[e] * G + gi);
        }
    }
}

// One k-block of a warp's 32 x 64 tile, NTU of its 8 B tiles live (a template, not a
// per-tile branch: with `if (nt < used)` ptxas grouped each tile's 8 mma's behind its
// branch, 2 independent accumulator chains deep; unrolled, 2 NTU chains interleave).
// Rows layout: wsm = the lane's weights in the stage (channel 32 warp + g, chunk c), xs = its
// permuted x slots (row g, run c). Stream: wsm = lane L of the warp's first unit, xs = row g.
template <int NTU, bool STREAM>
__device__ __forceinline__ void tg_kblock(float (&acc)[2][8][4], const uint4* wsm, const uint4* xs,
                                          const __half (&s)[8], const unsigned int (&z)[8], int c, int g,
                                          unsigned int lo) {
    uint4 wv[4];
    TgChan t[8];
    if (!STREAM) {
#pragma unroll  // e = 2 a + h: channel 32 warp + 16 a + 8 h + g, chunk c
        for (int e = 0; e < 4; ++e) wv[e] = wsm[(16 * (e >> 1) + 8 * (e & 1)) * 4];
#pragma unroll
        for (int e = 0; e < 4; ++e) t[e] = tg_chan(s[e], z[e]);
        const int sw = (c >> 1) | ((g & 1) << 1);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            unsigned int q[4][4];
#pragma unroll
            for (int e = 0; e < 4; ++e) tg_dequant2(tg_word(wv[e], i), t[e], t[e], lo, q[e]);
#pragma unroll
            for (int nt = 0; nt < NTU; ++nt) {
                const uint4 xv = xs[nt * 128 + (i ^ sw)];  // row 8 nt + g: (b00, b01, b10, b11)
#pragma unroll
                for (int a = 0; a < 2; ++a) {
                    const int l = 2 * a, h = 2 * a + 1;
                    tg_mma(acc[a][nt], q[l][0], q[h][0], q[l][1], q[h][1], xv);     // t = 0
                    tg_mma_hi(acc[a][nt], q[l][2], q[h][2], q[l][3], q[h][3], xv);  // t = 1
                }
            }
        }
    } else {
#pragma unroll  // 2 a + j: tile 2 warp + a, vector j (k-steps 4 j .. 4 j + 3)
        for (int v = 0; v < 4; ++v) wv[v] = wsm[64 * (v >> 1) + 32 * (v & 1)];
#pragma unroll
        for (int e = 0; e < 8; ++e) t[e] = tg_chan(s[e], z[e]);
#pragma unroll
        for (int p = 0; p < 4; ++p) {  // k-steps 2 p, 2 p + 1: word 2 (p & 1) + u of vector p >> 1
            const int j = p >> 1;
            unsigned int q[2][2][4];  // [a][u]
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
                for (int u = 0; u < 2; ++u)
                    tg_dequant2(tg_word(wv[2 * a + j], 2 * (p & 1) + u), t[2 * a + 4 * j], t[2 * a + 1 + 4 * j], lo,
                                q[a][u]);
#pragma unroll
            for (int nt = 0; nt < NTU; ++nt) {
                const uint4 xv = xs[nt * 128 + ((4 * p + c) ^ ((g & 1) << 2))];  // inputs 32 p + 8 c ..
#pragma unroll
                for (int a = 0; a < 2; ++a) {
                    tg_mma(acc[a][nt], q[a][0][0], q[a][0][1], q[a][0][2], q[a][0][3], xv);     // k-step 2 p
                    tg_mma_hi(acc[a][nt], q[a][1][0], q[a][1][1], q[a][1][2], q[a][1][3], xv);  // 2 p + 1
                }
            }
        }
    }
}

template <bool STREAM>
__device__ __forceinline__ void tiled_body(HR_TG_ARGS) {
    extern __shared__ uint4 tg_smem[];
    uint4* wring = tg_smem;                         // [TG_STAGES][TG_W_U4]
    uint4* xring = tg_smem + TG_STAGES * TG_W_U4;   // [TG_STAGES][TG_X_U4]
    uint4* perm = xring + TG_STAGES * TG_X_U4;      // [2][TG_X_U4] (rows layout only)
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int g = lane >> 2, c = lane & 3;
    const int m0 = blockIdx.x * TG_BM, n0 = blockIdx.y * TG_BN;
    const int KB = K / TG_KB, G = K / group_size;
    const int b0 = blockIdx.z * per, nk = min(KB, b0 + per) - b0;  // the host makes nk >= 1
    const int rows = min(TG_BM, M - m0);
    const int used = (rows + 7) >> 3;  // B tiles with a row below M
    const int srows = 8 * used;        // rows staged

    const uint4* wrow[4];
    const elem_t* xrow[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int q = tid + TG_THREADS * j;
        if (STREAM)  // unit (tile, 0) of tile n0 / 16 + (q >> 6), uint4 q & 63 (N % 16 == 0)
            wrow[j] = qw + 64ll * min(n0 / 16 + (q >> 6), N / 16 - 1) * KB + (q & 63);
        else
            wrow[j] = qw + (long long)min(n0 + (q >> 2), N - 1) * (K / 32) + (q & 3);
        xrow[j] = x + (long long)min(m0 + (q >> 4), M - 1) * x_stride + 8 * (q & 15);
    }
    // The lane's 4 channels: tile a (0, 1) x half h (g, g + 8), e = 2 a + h.
    int chn[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) chn[e] = min(n0 + 32 * warp + 16 * (e >> 1) + 8 * (e & 1) + g, N - 1);
    const unsigned int lo = (unsigned int)lo_mask;

#pragma unroll
    for (int p = 0; p < TG_STAGES - 1; ++p)
        tg_stage<STREAM>(wring + p * TG_W_U4, xring + p * TG_X_U4, wrow, xrow, b0 + p, p < nk, srows);
    __half s_cur[8], s_nxt[8];
    unsigned int z_cur[8], z_nxt[8];
    tg_load_chan<STREAM>(scales, zeros, chn, G, b0, c, group_size, s_cur, z_cur);
    if (!STREAM) {
        tg_wait<TG_STAGES - 2>();  // stage 0 (this thread's copies)
        tg_permute(xring, perm, srows);
    }

    float acc[2][8][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) acc[a][nt][0] = acc[a][nt][1] = acc[a][nt][2] = acc[a][nt][3] = 0.f;

    for (int r = 0; r < nk; ++r) {
        // rows layout: stages r and r + 1 landed (r + 1 is permuted below); stream: stage r
        if (STREAM)
            tg_wait<TG_STAGES - 2>();
        else
            tg_wait<TG_STAGES - 3>();
        __syncthreads();  // everyone's part; slot (r - 1) % S (and perm (r + 1) & 1) free
        {
            const int p = r + TG_STAGES - 1, slot = p % TG_STAGES;
            tg_stage<STREAM>(wring + slot * TG_W_U4, xring + slot * TG_X_U4, wrow, xrow, b0 + p, p < nk, srows);
        }
        if (r + 1 < nk) {
            tg_load_chan<STREAM>(scales, zeros, chn, G, b0 + r + 1, c, group_size, s_nxt, z_nxt);
            if (!STREAM)
                tg_permute(xring + ((r + 1) % TG_STAGES) * TG_X_U4, perm + ((r + 1) & 1) * TG_X_U4, srows);
        }
        const uint4* wsm = wring + (r % TG_STAGES) * TG_W_U4 +
                           (STREAM ? 2 * warp * 64 + lane : (32 * warp + g) * 4 + c);
        const uint4* xs = STREAM ? xring + (r % TG_STAGES) * TG_X_U4 + g * 16
                                 : perm + (r & 1) * TG_X_U4 + g * 16 + 4 * c;
        switch (used) {  // block-uniform: each case's mma's unrolled without branches
            case 1: tg_kblock<1, STREAM>(acc, wsm, xs, s_cur, z_cur, c, g, lo); break;
            case 2: tg_kblock<2, STREAM>(acc, wsm, xs, s_cur, z_cur, c, g, lo); break;
            case 3: tg_kblock<3, STREAM>(acc, wsm, xs, s_cur, z_cur, c, g, lo); break;
            case 4: tg_kblock<4, STREAM>(acc, wsm, xs, s_cur, z_cur, c, g, lo); break;
            case 5: tg_kblock<5, STREAM>(acc, wsm, xs, s_cur, z_cur, c, g, lo); break;
            case 6: tg_kblock<6, STREAM>(acc, wsm, xs, s_cur, z_cur, c, g, lo); break;
            case 7: tg_kblock<7, STREAM>(acc, wsm, xs, s_cur, z_cur, c, g, lo); break;
            default: tg_kblock<8, STREAM>(acc, wsm, xs, s_cur, z_cur, c, g, lo); break;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            s_cur[e] = s_nxt[e];
            z_cur[e] = z_nxt[e];
        }
    }
    tg_wait<0>();  // no copy outlives the block
    // C: acc[a][nt][j] = (channel n0 + 32 warp + 16 a + g + 8 (j >> 1), row m0 + 8 nt + 2 c + (j & 1)).
    float* part = gridDim.z > 1 ? ws + (long long)blockIdx.z * M * N : nullptr;
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int m = m0 + 8 * nt + 2 * c + (j & 1);
                const int n = n0 + 32 * warp + 16 * a + g + 8 * (j >> 1);
                if (nt < used && m < M && n < N) {
                    if (part)
                        part[(long long)m * N + n] = acc[a][nt][j];
                    else
                        y[m * y_stride + n] = from_f(acc[a][nt][j]);
                }
            }
}

// tiled_gemm: the rows layout; tiled_gemm_stream: the stream layout (cuda/int4_v4_gemv.cu).
extern "C" __global__ void __launch_bounds__(TG_THREADS, 1) tiled_gemm(HR_TG_ARGS) { tiled_body<false>(HR_TG_PASS); }
extern "C" __global__ void __launch_bounds__(TG_THREADS, 1) tiled_gemm_stream(HR_TG_ARGS) {
    tiled_body<true>(HR_TG_PASS);
}

// y [M, N] = sum over s of ws [s, M, N], in split order (deterministic).
extern "C" __global__ void __launch_bounds__(256) tiled_reduce(const float* __restrict__ ws, elem_t* __restrict__ y,
                                                                long long y_stride, int M, int N, int S) {
    const long long total = (long long)M * N;
    for (long long e = blockIdx.x * 256ll + threadIdx.x; e < total; e += (long long)gridDim.x * 256) {
        float v = 0.f;
        for (int s = 0; s < S; ++s) v += ws[s * total + e];
        const int m = (int)(e / N), n = (int)(e - (long long)m * N);
        y[m * y_stride + n] = from_f(v);
    }
}
