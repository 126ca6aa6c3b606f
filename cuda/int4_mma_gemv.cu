// W4A16 decode GEMV on tensor cores, reading the rows layout as it is (cuda/int4_gemm.cu
// draws it: qw uint32 [N, K / 8], nibble j of word w = input 8 w + j). Up to 8 rows of x in
// one launch at the cost of one. Compiled by NVRTC; HR_BF16 picks the activation dtype.
//
// Work split: block = one 16-channel tile (blockIdx.x) and MW_WK warps that split its K
// into contiguous runs of 128-input k-blocks; a shared-memory sum at the end (no workspace,
// no atomics: deterministic and graph-safe). Per k-block a lane (g = lane / 4, c = lane % 4)
// loads two 16-byte weight vectors, channels g and g + 8, inputs 32 c .. 32 c + 31 (the
// warp: 16 channels x 64 contiguous bytes), U k-blocks' worth before any math. PF = 1:
// then the next U k-blocks are prefetched into L2 (prefetch.global.L2 holds no registers),
// so a warp keeps ~2 U k-blocks in flight at the 64 registers that give 32 warps an SM.
//
// Math: mma.m16n8k16 with A = 16 channels x 16 inputs of W (exact small integers q - z),
// B = x^T (16 inputs x 8 rows of x), fp32 accumulate, so every product is exact and the
// sum is fp32; one k-block lies in one group (group_size % 128 == 0), its sum is scaled
// once: y += s * sum(x (q - z)). mma only needs A's and B's columns to name the same inputs,
// so k-step 2 i + t (word i of the lane's vector) maps column 2 c + h + 8 j to input
// 32 c + 8 i + 2 t + j + 4 h: A's pairs are then (nibble s, nibble s + 4), which one LOP3
// of (word >> 4 s) & 0x000F000F | magic makes 16-bit numbers (fp16 1024 + q; bf16 128 + q)
// and one FMA2 turns into q - z (the zero point folded into the constant); x's pairs
// (x_s, x_s+4) are one PRMT each. fp16 skips the shifts for odd s: 0x00F000F0 | 0x6400 is
// 1024 + 16 q, and FMA2 by 1/16 minus (64 + z) gives q - z (bf16's 7-bit mantissa cannot).
// SASS (sm_90, U = 2): ~174 instructions a lane per k-block of 64 weights in bf16 (~164 in
// fp16): 32 LOP3 + 32 HADD2 + 24 SHF (fp16: 8) + 16 PRMT + 8 HMMA + 10 loads + ~50 of
// addressing, scales and the loop; ~2.7 a weight, against gemv_m1's ~5.2 (670 a loop of 128
// weights a lane), which ncu found issue-bound (SM 70%, ALU 60%, DRAM 47% on 8B gate_up).
// At 4 warp-instructions a clock an SM, 174 a warp's k-block (1 KB of weights) caps the
// kernel near 5.9 TB/s of issue, above the 4.2 TB/s copy bandwidth (gemv_m1: ~3.1).

#include "int4_mma.cuh"  // i4_mma, i4_fma2, i4_zero, i4_ld_stream, ... (and elem2_type.cuh)

constexpr int MW_KB = 128;  // inputs per k-block

#if HR_BF16
constexpr unsigned int MW_MAGIC = 0x43004300u;  // 128.0 pair
constexpr unsigned int MW_ONE = 0x3F803F80u;
#else
constexpr unsigned int MW_MAGIC = 0x64006400u;  // 1024.0 pair
constexpr unsigned int MW_ONE = 0x3C003C00u;
constexpr unsigned int MW_SIXTEENTH = 0x2C002C00u;  // 1/16 pair
#endif

// q[s] = (nibble s - z, nibble s + 4 - z) of word w as a 16-bit pair, s = 0..3. `lo` is
// 0x000F000F in a register: the kernel takes it as an argument (lo_mask), because as a
// known constant next to the magic immediate ptxas re-made it with a MOV before every LOP3
// (26 of ~200 instructions a k-block).
__device__ __forceinline__ void mw_dequant(unsigned int w, I4Zero z, unsigned int lo, unsigned int (&q)[4]) {
#if HR_BF16
#pragma unroll
    for (int s = 0; s < 4; ++s) q[s] = i4_fma2(((w >> (4 * s)) & lo) | MW_MAGIC, MW_ONE, z.lo);
#else
    const unsigned int w8 = w >> 8, hi = lo << 4;
    q[0] = i4_fma2((w & lo) | MW_MAGIC, MW_ONE, z.lo);
    q[1] = i4_fma2((w & hi) | MW_MAGIC, MW_SIXTEENTH, z.hi);
    q[2] = i4_fma2((w8 & lo) | MW_MAGIC, MW_ONE, z.lo);
    q[3] = i4_fma2((w8 & hi) | MW_MAGIC, MW_SIXTEENTH, z.hi);
#endif
}

// One k-block: t += the 16 x 8 tile's 8 k-steps. wl / wh: channels g / g + 8; xr: the
// lane's 32 inputs of its x row (4 uint4).
__device__ __forceinline__ void mw_kblock(float (&t)[4], uint4 wl, uint4 wh, I4Zero zl, I4Zero zh,
                                          const uint4* __restrict__ xr, unsigned int lo) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint4 xv = __ldg(xr + i);  // inputs 8 i .. 8 i + 7 (pairs (0,1) (2,3) (4,5) (6,7))
        const unsigned int b00 = __byte_perm(xv.x, xv.z, 0x5410), b01 = __byte_perm(xv.x, xv.z, 0x7632);
        const unsigned int b10 = __byte_perm(xv.y, xv.w, 0x5410), b11 = __byte_perm(xv.y, xv.w, 0x7632);
        unsigned int ql[4], qh[4];
        mw_dequant(i4_word(wl, i), zl, lo, ql);
        mw_dequant(i4_word(wh, i), zh, lo, qh);
        i4_mma(t, ql[0], qh[0], ql[1], qh[1], b00, b01);  // t = 0: inputs 0, 4 | 1, 5
        i4_mma(t, ql[2], qh[2], ql[3], qh[3], b10, b11);  // t = 1: inputs 2, 6 | 3, 7
    }
}

#define HR_MW_ARGS                                                                              \
    const elem_t *__restrict__ x, long long x_stride, const uint4 *__restrict__ qw,          \
        const __half *__restrict__ scales, const unsigned char *__restrict__ zeros,             \
        elem_t *__restrict__ y, long long y_stride, int N, int K, int group_size, int M, int lo_mask
#define HR_MW_PASS x, x_stride, qw, scales, zeros, y, y_stride, N, K, group_size, M, lo_mask

template <int WK, int U, int PF>
__device__ __forceinline__ void mma_gemv(HR_MW_ARGS) {
    __shared__ float red[WK][4][32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane >> 2, c = lane & 3;
    const int KB = K / MW_KB, G = K / group_size, bpg = group_size / MW_KB;
    const int per = (KB + WK - 1) / WK;
    const int b0 = warp * per, b1 = min(KB, b0 + per);
    // Channels past N (N % 16 != 0) re-read row N - 1; their outputs are not written.
    const int ch = blockIdx.x * 16 + g;
    const int nl = min(ch, N - 1), nh = min(ch + 8, N - 1);
    // Pointers at k-block b0, stepped U k-blocks a round (no 64-bit index math per load).
    const uint4* wlp = qw + (long long)nl * (K / 32) + c + 4 * b0;
    const uint4* whp = qw + (long long)nh * (K / 32) + c + 4 * b0;
    // B column g is x row g; lanes past the last row re-read row 0 (columns >= M not written).
    const uint4* xr = reinterpret_cast<const uint4*>(x + (long long)(g < M ? g : 0) * x_stride) + 4 * c + 16 * b0;
    const __half* slp = scales + (long long)nl * G;
    const __half* shp = scales + (long long)nh * G;
    const unsigned char* zlp = zeros + (long long)nl * G;
    const unsigned char* zhp = zeros + (long long)nh * G;
    const unsigned int lo = (unsigned int)lo_mask;  // 0x000F000F (mw_dequant)
    // The warp walks its k-blocks in order: the group changes every bpg (no division a block).
    int gi = b0 / bpg, g_next = (gi + 1) * bpg;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int b = b0; b < b1; b += U, wlp += 4 * U, whp += 4 * U, xr += 16 * U) {
        if (PF) {  // the next round (first: no registers are live yet)
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (b + U + u < b1) {
                    i4_prefetch(wlp + 4 * (U + u));
                    i4_prefetch(whp + 4 * (U + u));
                }
            }
        }
        uint4 wl[U], wh[U];
        float sl[U], sh[U];
        unsigned int zl[U], zh[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (b + u < b1) {
                wl[u] = i4_ld_stream(wlp + 4 * u);
                wh[u] = i4_ld_stream(whp + 4 * u);
                if (b + u == g_next) {
                    ++gi;
                    g_next += bpg;
                }
                sl[u] = __half2float(__ldg(slp + gi));
                sh[u] = __half2float(__ldg(shp + gi));
                zl[u] = __ldg(zlp + gi);
                zh[u] = __ldg(zhp + gi);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (b + u < b1) {
                float t[4] = {0.f, 0.f, 0.f, 0.f};
                mw_kblock(t, wl[u], wh[u], i4_zero(zl[u]), i4_zero(zh[u]), xr + 16 * u, lo);
                acc[0] = fmaf(sl[u], t[0], acc[0]);  // C: (channel g, x rows 2c, 2c + 1),
                acc[1] = fmaf(sl[u], t[1], acc[1]);  //    (channel g + 8, x rows 2c, 2c + 1)
                acc[2] = fmaf(sh[u], t[2], acc[2]);
                acc[3] = fmaf(sh[u], t[3], acc[3]);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) red[warp][j][lane] = acc[j];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < WK; ++w) v += red[w][j][lane];
        const int m = 2 * c + (j & 1);
        const int n = j < 2 ? ch : ch + 8;
        if (m < M && n < N) y[m * y_stride + n] = from_f(v);
    }
}

// mma_gemv_w{WK}_u{U}[_pf]: WK warps a block split K, U k-blocks loaded together per warp,
// _pf: the next U prefetched. cuda/int4_mma_gemv.py's VARIANTS lists the same set. U = 2 is
// capped at 64 registers (32 warps an SM, no spills); U = 4 needs ~96 (80 spills), so it
// keeps ~20 warps an SM.
#define HR_MW_MIN_BLOCKS(WK, U) ((U) == 2 ? 32 / (WK) : 1)
#define HR_MW_KERNEL(WK, U, PF, SUFFIX)                                                \
    extern "C" __global__ void __launch_bounds__(WK * 32, HR_MW_MIN_BLOCKS(WK, U))     \
        mma_gemv_w##WK##_u##U##SUFFIX(HR_MW_ARGS) {                                    \
        mma_gemv<WK, U, PF>(HR_MW_PASS);                                               \
    }
#define HR_MW_KERNELS(WK, U) HR_MW_KERNEL(WK, U, 0, ) HR_MW_KERNEL(WK, U, 1, _pf)
HR_MW_KERNELS(4, 2)
HR_MW_KERNELS(4, 4)
HR_MW_KERNELS(8, 2)
HR_MW_KERNELS(8, 4)
HR_MW_KERNELS(16, 2)
HR_MW_KERNELS(16, 4)

// ---- Skinny GEMM (issue 14): R = 8 NT rows of x a launch, for decode batches past 8 rows ----
// Same A as mma_gemv (16 channels x 16 inputs of W, dequantized in registers with LOP3/FMA2,
// the same input map), but each k-step's A is used for NT mma's, one per 8 rows of x, so a
// launch reads the 4-bit weight once for R rows (the GEMV: once for 8). acc[NT][4] and the
// k-block's exact partial sums t[NT][4] (scaled once a k-block, as in mma_gemv).
//
// Why x goes through shared memory: B is read once per 16-channel tile, R x 128 x 2 bytes a
// k-block against the tile's 1 KB of weights, so with one tile a block (the GEMV's split) x
// traffic is M / 4 times the weight's bytes (16x at R = 64): from L2 that is ~3.7 GB a launch
// on the 70B gate_up, slower than today's dequantize. A block here holds TW tiles (TW warps
// along N) that share each staged x k-block: the L2 -> SM traffic for x drops to M / (4 TW)
// times the weights (2x at R = 64, TW = 8). The block's WK slices (TW warps each) split K
// into contiguous runs as the GEMV's warps do; one round stages every slice's next x k-block
// with cp.async (double-buffered, no registers) while the warps do this round's math.
// Shared-memory reads stay NT x 2 KB a warp's k-block (the same bytes the L1 would serve);
// a swizzle (chunk j of a row's 32-input run c at j ^ ((c >> 1) | (row & 1) << 1)) makes
// each quarter-warp's 16-byte loads hit 8 distinct 16-byte bank groups. Weights: registers
// one round ahead plus prefetch.global.L2 MS_PF rounds ahead (a block holds 8 warps and
// ~1 block an SM at these register counts, so the L2 prefetch carries the HBM latency).
// Rows past M: staged as row M - 1 (no uninitialised bytes), their 8-row tiles skipped
// (warp-uniform), their outputs not written. End: the slices' sums in a fixed order in
// shared memory (no atomics, no workspace: deterministic and graph-safe).
constexpr int MS_PF = 4;  // rounds of weights prefetched into L2 ahead

__device__ __forceinline__ void ms_cp16(void* smem, const void* gmem) {
    const unsigned int s = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

// Stage round r's x k-block of every slice (rows 0 .. rows - 1) into buffer r & 1:
// [slice][row][16 uint4], uint4 (c, j) = inputs 32 c + 8 j .. + 7 at 4 c + (j ^ swizzle).
template <int TW, int WK, int NT>
__device__ __forceinline__ void ms_stage(uint4* smem, const elem_t* __restrict__ x, long long x_stride,
                                         int r, int per, int KB, int rows, int M) {
    constexpr int SLICE = NT * 8 * 16;
#pragma unroll
    for (int s = 0; s < WK; ++s) {
        const int b = s * per + r;
        if (r < per && b < KB) {
            uint4* dst = smem + ((r & 1) * WK + s) * SLICE;
            for (int q = threadIdx.x; q < rows * 16; q += TW * WK * 32) {
                const int row = q >> 4, c = (q >> 2) & 3, j = q & 3;
                const elem_t* src = x + (long long)min(row, M - 1) * x_stride + b * MW_KB + 32 * c + 8 * j;
                ms_cp16(dst + row * 16 + 4 * c + (j ^ ((c >> 1) | ((row & 1) << 1))), src);
            }
        }
    }
    i4_commit();  // an empty group past the last round keeps wait_group 1's count right
}

template <int TW, int WK, int NT>
__device__ __forceinline__ void mma_skinny(HR_MW_ARGS) {
    extern __shared__ uint4 ms_smem[];
    constexpr int SLICE = NT * 8 * 16;  // uint4 a slice's staged k-block
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane >> 2, c = lane & 3;
    const int ks = warp / TW, tw = warp - ks * TW;
    const int KB = K / MW_KB, bpg = group_size / MW_KB, G = K / group_size;
    const int per = (KB + WK - 1) / WK;
    const int b0 = ks * per, b1 = min(KB, b0 + per);
    const int used = min(NT, (M + 7) >> 3);  // 8-row tiles of x with a row below M
    const int rows = 8 * used;
    // Channels past N (N % 16 != 0) re-read row N - 1; their outputs are not written.
    const int ch = (blockIdx.x * TW + tw) * 16 + g;
    const int nl = min(ch, N - 1), nh = min(ch + 8, N - 1);
    const uint4* wlp = qw + (long long)nl * (K / 32) + c + 4 * b0;
    const uint4* whp = qw + (long long)nh * (K / 32) + c + 4 * b0;
    const __half* slp = scales + (long long)nl * G;
    const __half* shp = scales + (long long)nh * G;
    const unsigned char* zlp = zeros + (long long)nl * G;
    const unsigned char* zhp = zeros + (long long)nh * G;
    const unsigned int lo = (unsigned int)lo_mask;
    const int sw = (c >> 1) | ((g & 1) << 1);  // this lane's swizzle (row 8 nt + g: g & 1)

    ms_stage<TW, WK, NT>(ms_smem, x, x_stride, 0, per, KB, rows, M);
    uint4 wl = make_uint4(0, 0, 0, 0), wh = wl;
    float sl = 0.f, sh = 0.f;
    unsigned int zl = 0, zh = 0;
    if (b0 < b1) {
        wl = i4_ld_stream(wlp);
        wh = i4_ld_stream(whp);
        const int gi = b0 / bpg;
        sl = __half2float(__ldg(slp + gi));
        sh = __half2float(__ldg(shp + gi));
        zl = __ldg(zlp + gi);
        zh = __ldg(zhp + gi);
    }
#pragma unroll
    for (int d = 1; d <= MS_PF; ++d) {
        if (b0 + d < b1) {
            i4_prefetch(wlp + 4 * d);
            i4_prefetch(whp + 4 * d);
        }
    }
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

    for (int r = 0; r < per; ++r) {
        const int b = b0 + r;
        ms_stage<TW, WK, NT>(ms_smem, x, x_stride, r + 1, per, KB, rows, M);
        if (b + 1 + MS_PF < b1) {
            i4_prefetch(wlp + 4 * (r + 1 + MS_PF));
            i4_prefetch(whp + 4 * (r + 1 + MS_PF));
        }
        uint4 nwl = wl, nwh = wh;
        float nsl = sl, nsh = sh;
        unsigned int nzl = zl, nzh = zh;
        if (b + 1 < b1) {  // next round's weights, in flight during this round's math
            nwl = i4_ld_stream(wlp + 4 * (r + 1));
            nwh = i4_ld_stream(whp + 4 * (r + 1));
            const int gi = (b + 1) / bpg;
            nsl = __half2float(__ldg(slp + gi));
            nsh = __half2float(__ldg(shp + gi));
            nzl = __ldg(zlp + gi);
            nzh = __ldg(zhp + gi);
        }
        i4_wait<1>();  // this round's x (the group before the one just committed)
        __syncthreads();
        if (b < b1) {
            const uint4* xs = ms_smem + ((r & 1) * WK + ks) * SLICE + g * 16 + 4 * c;
            const I4Zero zlo = i4_zero(zl), zhi = i4_zero(zh);
            float t[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) t[nt][0] = t[nt][1] = t[nt][2] = t[nt][3] = 0.f;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                unsigned int ql[4], qh[4];
                mw_dequant(i4_word(wl, i), zlo, lo, ql);
                mw_dequant(i4_word(wh, i), zhi, lo, qh);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    if (nt < used) {  // warp-uniform
                        const uint4 xv = xs[nt * 128 + (i ^ sw)];  // row 8 nt + g, inputs 32 c + 8 i ..
                        const unsigned int b00 = __byte_perm(xv.x, xv.z, 0x5410);
                        const unsigned int b01 = __byte_perm(xv.x, xv.z, 0x7632);
                        const unsigned int b10 = __byte_perm(xv.y, xv.w, 0x5410);
                        const unsigned int b11 = __byte_perm(xv.y, xv.w, 0x7632);
                        i4_mma(t[nt], ql[0], qh[0], ql[1], qh[1], b00, b01);
                        i4_mma(t[nt], ql[2], qh[2], ql[3], qh[3], b10, b11);
                    }
                }
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                acc[nt][0] = fmaf(sl, t[nt][0], acc[nt][0]);  // C: (channel g, x rows 8 nt + 2c, + 1),
                acc[nt][1] = fmaf(sl, t[nt][1], acc[nt][1]);  //    (channel g + 8, the same rows)
                acc[nt][2] = fmaf(sh, t[nt][2], acc[nt][2]);
                acc[nt][3] = fmaf(sh, t[nt][3], acc[nt][3]);
            }
        }
        __syncthreads();  // buffer r & 1 is free for round r + 2's stage
        wl = nwl;
        wh = nwh;
        sl = nsl;
        sh = nsh;
        zl = nzl;
        zh = nzh;
    }
    if (WK > 1) {
        float* red = reinterpret_cast<float*>(ms_smem);  // [WK][TW][NT][4][32]; x's buffers are free
        i4_skinny_put<TW, NT>(acc, red, ks, tw, lane);
        __syncthreads();
        if (ks != 0) return;
        i4_skinny_add<TW, WK, NT>(acc, red, tw, lane);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int m = 8 * nt + 2 * c + (j & 1);
            const int n = j < 2 ? ch : ch + 8;
            if (m < M && n < N) y[m * y_stride + n] = from_f(acc[nt][j]);
        }
}

// mma_skinny_t{TW}_w{WK}_n{NT}: TW tiles a block, WK slices split K, NT 8-row tiles of x
// (R = 8 NT rows a launch). cuda/int4_mma_gemv.py's SKINNY_VARIANTS lists the same set and
// its shared-memory size. 256 threads each.
// NT = 4 is capped at 128 registers (2 blocks, 16 warps an SM); NT = 8 needs ~190 (acc and
// t alone are 64), so it keeps one block of 8 warps an SM.
#define HR_MS_MIN_BLOCKS(NT) ((NT) == 4 ? 2 : 1)
#define HR_MS_KERNEL(TW, WK, NT)                                                           \
    extern "C" __global__ void __launch_bounds__(TW * WK * 32, HR_MS_MIN_BLOCKS(NT))       \
        mma_skinny_t##TW##_w##WK##_n##NT(HR_MW_ARGS) {                                     \
        mma_skinny<TW, WK, NT>(HR_MW_PASS);                                                \
    }
HR_MS_KERNEL(8, 1, 4)
HR_MS_KERNEL(4, 2, 4)
HR_MS_KERNEL(2, 4, 4)
HR_MS_KERNEL(8, 1, 8)
HR_MS_KERNEL(4, 2, 8)
HR_MS_KERNEL(2, 4, 8)
