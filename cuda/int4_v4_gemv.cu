// W4A16 decode GEMV, round 4 (HEADRACE_INT4_GEMV=v4): tensor cores on the "stream" layout
// (cuda/int4_v4_gemv.py packs it at load), weights copied global -> shared by cp.async
// through a per-warp ring of S k-blocks, so S - 1 KB of every warp's weights are in flight
// while it does the math on one. Up to 8 rows of x a launch. HR_BF16: the activation dtype.
//
// Layout: W [N, K] cut into units of 16 channels x 128 inputs (a tile's k-block, 1 KB),
// stored tile-major then k-block: unit (t, b) at uint4 64 (t KB + b). Inside a unit, uint4
// 32 j + L is lane L's vector j (j = 0, 1): one warp load of vector j reads 512 contiguous
// bytes, and a warp's run of k-blocks of one tile is one contiguous stream. Word w of
// vector j is k-step ks = 4 j + w of mma.m16n8k16 for lane L = 4 g + c; its nibble s + 4 h
// (s = 0..3, h = 0, 1) is the A fragment's register s, element h: channel g + 8 (s & 1),
// input 32 (ks / 2) + 8 c + 4 (ks % 2) + 2 (s >> 1) + h of the k-block. So:
//  - (word >> 4 s) & 0x000F000F is A register s as two nibbles; OR magic makes them exact
//    16-bit numbers and one FMA2 (zero point folded into the constant) makes q - z;
//  - lane c's B registers of k-steps 2 p and 2 p + 1 are x inputs 32 p + 8 c .. + 7: one
//    16-byte load of x gives all four (no PRMT);
//  - vector 0 holds inputs 0..63 of the k-block and vector 1 inputs 64..127, so a group of
//    64 splits a k-block into two sums, each scaled once (groups of >= 128: one scale).
// SASS (sm_90, NVRTC 13.0, w4_s4, bf16): 202 instructions a loop of one k-block a lane (64
// weights; fp16 189): 32 LOP3 + 32 FMA2 (as HADD2) + 29 SHF + 8 HMMA + 4 LDG x + 4 LDG
// scales / zeros + 2 LDS + 2 LDGSTS + ~50 of addresses, loop and scaling (+4 loads and ~10
// more for groups of 64): ~3.1 a weight, no PRMT. Issue: 1 KB a warp per ~200 issues caps
// the kernel near 5.3 TB/s (132 SMs x 4 a clock x 1.98 GHz); the INT pipe (half rate, ~87
// LOP3 / SHF / IADD3 / LEA) near 6.1 TB/s: ~80% / ~70% busy at the 4.2 TB/s copy bandwidth.
//
// Work split: block = one 16-channel tile (blockIdx.x) and WK warps that split its
// k-blocks into contiguous runs; WK = 1 needs no sum, else a shared-memory sum at the end
// (no workspace, no atomics: deterministic and graph-safe). The rule (cuda/int4_v4_gemv.py)
// picks WK so that every warp of the grid is resident at once (one wave of streams).

#include "int4_mma.cuh"  // i4_mma, i4_fma2, i4_zero, i4_ld_stream, ... (and elem2_type.cuh)

constexpr int V4_KB = 128;   // inputs per k-block
constexpr int V4_UNIT = 64;  // uint4 per unit (16 channels x 128 inputs)

#if HR_BF16
constexpr unsigned int V4_MAGIC = 0x43004300u;  // 128.0 pair
constexpr unsigned int V4_ONE = 0x3F803F80u;
#else
constexpr unsigned int V4_MAGIC = 0x64006400u;  // 1024.0 pair
constexpr unsigned int V4_ONE = 0x3C003C00u;
constexpr unsigned int V4_SIXTEENTH = 0x2C002C00u;  // 1/16 pair
#endif

// 16 bytes global -> shared, bypassing L1 (.cg); completion tracked by commit / wait groups.
__device__ __forceinline__ void v4_cp16(unsigned int dst, const uint4* src) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}

// Programmatic Dependent Launch (HEADRACE_PDL=1; cuda/gemv_step.cu has the same pair): launched
// so, the kernel may start while the previous one still runs. Before v4_griddep_wait it
// touches only the weights, scales and zeros (written by no kernel); x is read and y
// written after it. Without the launch attribute the wait returns at once.
__device__ __forceinline__ void v4_griddep_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void v4_griddep_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ uint4 v4_lds(unsigned int addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr)
                 : "memory");
    return v;
}

// A registers of one k-step from word w: s even is channel g (zero zg), s odd channel
// g + 8 (zero zh). `lo` is 0x000F000F passed in a register (round 3: as a constant next to
// the magic immediate, ptxas re-made it with a MOV before every LOP3).
__device__ __forceinline__ void v4_dequant(unsigned int w, I4Zero zg, I4Zero zh, unsigned int lo,
                                           unsigned int (&a)[4]) {
#if HR_BF16
    const unsigned int w4 = w >> 4;
    a[0] = i4_fma2((w & lo) | V4_MAGIC, V4_ONE, zg.lo);
    a[1] = i4_fma2((w4 & lo) | V4_MAGIC, V4_ONE, zh.lo);
    a[2] = i4_fma2(((w >> 8) & lo) | V4_MAGIC, V4_ONE, zg.lo);
    a[3] = i4_fma2(((w4 >> 8) & lo) | V4_MAGIC, V4_ONE, zh.lo);
#else
    const unsigned int w8 = w >> 8, hi = lo << 4;
    a[0] = i4_fma2((w & lo) | V4_MAGIC, V4_ONE, zg.lo);
    a[1] = i4_fma2((w & hi) | V4_MAGIC, V4_SIXTEENTH, zh.hi);
    a[2] = i4_fma2((w8 & lo) | V4_MAGIC, V4_ONE, zg.lo);
    a[3] = i4_fma2((w8 & hi) | V4_MAGIC, V4_SIXTEENTH, zh.hi);
#endif
}

// An A fragment as one array (round 4's dequantization fills it so).
__device__ __forceinline__ void v4_mma(float (&d)[4], const unsigned int (&a)[4], unsigned int b0,
                                       unsigned int b1) {
    i4_mma(d, a[0], a[1], a[2], a[3], b0, b1);
}

// Half j of a k-block (k-steps 4 j .. 4 j + 3, inputs 64 j .. 64 j + 63) into t.
// xa, xb: the lane's x inputs 32 (2 j) + 8 c .. and 32 (2 j + 1) + 8 c .. (8 each).
__device__ __forceinline__ void v4_half(float (&t)[4], const uint4& w, const uint4& xa, const uint4& xb,
                                        I4Zero zg, I4Zero zh, unsigned int lo) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint4& xv = i < 2 ? xa : xb;
        unsigned int a[4];
        v4_dequant(i4_word(w, i), zg, zh, lo, a);
        if (i % 2 == 0) {
            v4_mma(t, a, xv.x, xv.y);  // k-step 4 j + i even: inputs 8 c + 0..3
        } else {
            v4_mma(t, a, xv.z, xv.w);  // odd: 8 c + 4..7
        }
    }
}

#define HR_V4_ARGS                                                                            \
    const elem_t *__restrict__ x, long long x_stride, const uint4 *__restrict__ qv,          \
        const __half *__restrict__ scales, const unsigned char *__restrict__ zeros,           \
        elem_t *__restrict__ y, long long y_stride, int N, int K, int group_shift, int M,      \
        int lo_mask
#define HR_V4_PASS x, x_stride, qv, scales, zeros, y, y_stride, N, K, group_shift, M, lo_mask

template <int WK, int S>
__device__ __forceinline__ void v4_gemv(HR_V4_ARGS) {
    extern __shared__ uint4 v4_ring[];  // [WK][S][64]: each warp's ring of S units
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane >> 2, c = lane & 3;
    const int KB = K / V4_KB, G = K >> group_shift;
    const int per = (KB + WK - 1) / WK;
    const int b0 = min(KB, warp * per), nb = min(KB, b0 + per) - b0;
    const int tile = blockIdx.x, ch = tile * 16 + g;  // N % 16 == 0 (the layout needs it)
    const uint4* src = qv + ((long long)tile * KB + b0) * V4_UNIT + lane;
    // Shared addresses of this lane's vector 0 in slot 0; slot s adds 1024 s, vector 1 512.
    const unsigned int mine =
        (unsigned int)__cvta_generic_to_shared(v4_ring + warp * S * V4_UNIT + lane);
    // x rows past M re-read row 0 (their columns are not written).
    const uint4* xr = reinterpret_cast<const uint4*>(x + (long long)(g < M ? g : 0) * x_stride) +
                      (long long)b0 * 16 + c;
    const __half* sg = scales + (long long)ch * G;
    const unsigned char* zgp = zeros + (long long)ch * G;
    const unsigned int lo = (unsigned int)lo_mask;
    if (nb > 0) {  // the run's first and last lines of scales and zeros into L2 (the lane's
        // first use of each would otherwise wait a DRAM round trip after its unit landed)
        const long long first = (long long)(b0 * V4_KB) >> group_shift;
        const long long last = (long long)((b0 + nb) * V4_KB - 1) >> group_shift;
        const long long h = (c & 1) ? 8LL * G : 0;  // lanes c odd: channel g + 8's
        i4_prefetch((c & 2) ? (const void*)(sg + h + last) : (const void*)(sg + h + first));
        i4_prefetch((c & 2) ? (const void*)(zgp + h + last) : (const void*)(zgp + h + first));
    }
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {  // the ring's first S - 1 units
        if (s < nb) {
            v4_cp16(mine + 1024 * s, src + V4_UNIT * s);
            v4_cp16(mine + 1024 * s + 512, src + V4_UNIT * s + 32);
        }
        i4_commit();
    }
    v4_griddep_wait();  // x comes from the previous kernel
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    // Rolling state (no 64-bit index math or modulo per k-block): the unit S - 1 ahead,
    // its slot, the slot read now, x of this k-block, this k-block's first input.
    const uint4* ahead = src + V4_UNIT * (S - 1);
    unsigned int wr = mine + 1024 * (S - 1), rd = mine;
    const unsigned int ring_end = mine + 1024 * S;
    int k0 = b0 * V4_KB;
    const long long hoff = 8LL * G;  // channel g + 8's scales / zeros from channel g's
    for (int i = 0; i < nb; ++i, ahead += V4_UNIT, xr += 16, k0 += V4_KB) {
        if (i + S - 1 < nb) {  // its slot was read in iteration i - 1, by this lane only
            v4_cp16(wr, ahead);
            v4_cp16(wr + 512, ahead + 32);
        }
        i4_commit();
        wr = wr + 1024 == ring_end ? mine : wr + 1024;
        // x, scales and zeros of k-block i, issued before the wait so their latency overlaps
        const uint4 x0 = __ldg(xr), x1 = __ldg(xr + 4), x2 = __ldg(xr + 8), x3 = __ldg(xr + 12);
        const int g0 = k0 >> group_shift, g1 = (k0 + 64) >> group_shift;
        const float s0g = __half2float(__ldg(sg + g0)), s0h = __half2float(__ldg(sg + hoff + g0));
        const unsigned int z0g = __ldg(zgp + g0), z0h = __ldg(zgp + hoff + g0);
        float s1g = s0g, s1h = s0h;
        unsigned int z1g = z0g, z1h = z0h;
        if (g1 != g0) {  // groups of 64 (uniform across the grid)
            s1g = __half2float(__ldg(sg + g1));
            s1h = __half2float(__ldg(sg + hoff + g1));
            z1g = __ldg(zgp + g1);
            z1h = __ldg(zgp + hoff + g1);
        }
        i4_wait<S - 1>();  // unit i has landed (this lane's copies, seen by this lane)
        const uint4 w0 = v4_lds(rd), w1 = v4_lds(rd + 512);
        rd = rd + 1024 == ring_end ? mine : rd + 1024;
        float t0[4] = {0.f, 0.f, 0.f, 0.f}, t1[4] = {0.f, 0.f, 0.f, 0.f};
        v4_half(t0, w0, x0, x1, i4_zero(z0g), i4_zero(z0h), lo);
        v4_half(t1, w1, x2, x3, i4_zero(z1g), i4_zero(z1h), lo);
        // C: t[0], t[1] channel g, x rows 2c, 2c + 1; t[2], t[3] channel g + 8
        acc[0] += s0g * t0[0] + s1g * t1[0];
        acc[1] += s0g * t0[1] + s1g * t1[1];
        acc[2] += s0h * t0[2] + s1h * t1[2];
        acc[3] += s0h * t0[3] + s1h * t1[3];
    }
    v4_griddep_launch_dependents();  // every weight is read: the next GEMV may start its own
    if (WK > 1) {
        // Partials in this warp's own ring (its copies have all landed: the last wait had
        // none pending); other lanes of the warp may still read their last unit: syncwarp.
        i4_wait<0>();
        __syncwarp();
        float* red = reinterpret_cast<float*>(v4_ring + warp * S * V4_UNIT);
#pragma unroll
        for (int j = 0; j < 4; ++j) red[32 * j + lane] = acc[j];
        __syncthreads();
        if (warp != 0) return;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < WK; ++w) v += reinterpret_cast<const float*>(v4_ring + w * S * V4_UNIT)[32 * j + lane];
            acc[j] = v;
        }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int m = 2 * c + (j & 1);
        const int n = j < 2 ? ch : ch + 8;
        if (m < M) y[m * y_stride + n] = from_f(acc[j]);
    }
}

// v4_gemv_w{WK}_s{S}: WK warps a block split K, S units in each warp's ring (S - 1 in
// flight). 64 registers at most (32 warps an SM); cuda/int4_v4_gemv.py's VARIANTS lists
// the same set.
#define HR_V4_KERNEL(WK, S)                                                              \
    extern "C" __global__ void __launch_bounds__(WK * 32, 32 / WK) v4_gemv_w##WK##_s##S( \
        HR_V4_ARGS) {                                                                    \
        v4_gemv<WK, S>(HR_V4_PASS);                                                      \
    }
#define HR_V4_KERNELS(WK) HR_V4_KERNEL(WK, 4) HR_V4_KERNEL(WK, 6)
HR_V4_KERNELS(1)
HR_V4_KERNELS(2)
HR_V4_KERNELS(4)
HR_V4_KERNELS(8)
HR_V4_KERNELS(16)

// ---- Skinny GEMM on the stream layout (issue 14): R = 8 NT rows of x a launch ----
// Round 3's mma_skinny (cuda/int4_mma_gemv.cu gives the reasons) on this layout, for decode
// batches past 8 rows: each k-step's A (v4_dequant, as above) is used for NT mma's, one per
// 8 rows of x, so a launch reads the 4-bit weight once for R rows. A block holds TW tiles
// (TW warps along N) sharing each x k-block staged in shared memory by cp.async (double
// buffered), and WK slices of TW warps splitting K; the slices' sums in a fixed order at
// the end (no atomics, no workspace). Weights: straight into registers one round ahead
// (ld.global.nc, L1 bypassed) plus prefetch.global.L2 VS_PF rounds ahead, since a block's
// 8 warps share barriers and a per-warp ring would hold registers' worth of shared memory.
// Staged x: [slice][row][16 uint4], chunk e (inputs 8 e .. 8 e + 7 of the k-block) at
// e ^ ((row & 1) << 2): lane (g, c) reads chunk 4 p + c of row 8 nt + g, so a quarter-warp
// (rows g and g + 1, c = 0..3) hits 8 distinct 16-byte bank groups. Groups of 64: each half
// k-block scaled once (t is reset between halves). Rows past M: staged as row M - 1, their
// 8-row tiles skipped (warp-uniform), outputs not written; tiles past N / 16 re-read the
// last tile and write nothing.
constexpr int VS_PF = 4;  // rounds of weights prefetched into L2 ahead

template <int TW, int WK, int NT>
__device__ __forceinline__ void vs_stage(unsigned int base, const elem_t* __restrict__ x, long long x_stride,
                                         int r, int per, int KB, int rows, int M) {
    constexpr int SLICE = NT * 8 * 16;  // uint4 a slice's staged k-block
#pragma unroll
    for (int s = 0; s < WK; ++s) {
        const int b = s * per + r;
        if (r < per && b < KB) {
            const unsigned int dst = base + 16u * (unsigned int)(((r & 1) * WK + s) * SLICE);
            for (int q = threadIdx.x; q < rows * 16; q += TW * WK * 32) {
                const int row = q >> 4, e = q & 15;
                const uint4* src =
                    reinterpret_cast<const uint4*>(x + (long long)min(row, M - 1) * x_stride + b * V4_KB) + e;
                v4_cp16(dst + 16u * (unsigned int)(row * 16 + (e ^ ((row & 1) << 2))), src);
            }
        }
    }
    i4_commit();  // an empty group past the last round keeps wait_group 1's count right
}

// The weights, scales and zeros of one k-block (two halves: groups of 64 differ).
struct VsBlock {
    uint4 w0, w1;
    float s0g, s0h, s1g, s1h;
    unsigned int z0g, z0h, z1g, z1h;
};

__device__ __forceinline__ void vs_load(VsBlock& v, const uint4* wp, const __half* sg, const unsigned char* zgp,
                                        long long hoff, int k0, int group_shift) {
    v.w0 = i4_ld_stream(wp);
    v.w1 = i4_ld_stream(wp + 32);
    const int g0 = k0 >> group_shift, g1 = (k0 + 64) >> group_shift;
    v.s0g = __half2float(__ldg(sg + g0));
    v.s0h = __half2float(__ldg(sg + hoff + g0));
    v.z0g = __ldg(zgp + g0);
    v.z0h = __ldg(zgp + hoff + g0);
    v.s1g = v.s0g, v.s1h = v.s0h, v.z1g = v.z0g, v.z1h = v.z0h;
    if (g1 != g0) {  // groups of 64 (uniform across the grid)
        v.s1g = __half2float(__ldg(sg + g1));
        v.s1h = __half2float(__ldg(sg + hoff + g1));
        v.z1g = __ldg(zgp + g1);
        v.z1h = __ldg(zgp + hoff + g1);
    }
}

template <int TW, int WK, int NT>
__device__ __forceinline__ void v4_skinny(HR_V4_ARGS) {
    extern __shared__ uint4 vs_smem[];
    constexpr int SLICE = NT * 8 * 16;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane >> 2, c = lane & 3;
    const int ks = warp / TW, tw = warp - ks * TW;
    const int KB = K / V4_KB, G = K >> group_shift, tiles = N / 16;
    const int per = (KB + WK - 1) / WK;
    const int b0 = ks * per, b1 = min(KB, b0 + per);
    const int used = min(NT, (M + 7) >> 3);  // 8-row tiles of x with a row below M
    const int rows = 8 * used;
    const int tile_raw = blockIdx.x * TW + tw, tile = min(tile_raw, tiles - 1);
    const int ch = tile * 16 + g;
    const uint4* wp = qv + ((long long)tile * KB + b0) * V4_UNIT + lane;  // vector 0 of k-block b0
    const __half* sg = scales + (long long)ch * G;
    const unsigned char* zgp = zeros + (long long)ch * G;
    const long long hoff = 8LL * G;  // channel g + 8's scales / zeros from channel g's
    const unsigned int lo = (unsigned int)lo_mask;
    const unsigned int base = (unsigned int)__cvta_generic_to_shared(vs_smem);
    const int swz = (g & 1) << 2;

    v4_griddep_wait();  // x comes from the previous kernel (a no-op without PDL)
    vs_stage<TW, WK, NT>(base, x, x_stride, 0, per, KB, rows, M);
    VsBlock cur = {};
    if (b0 < b1) vs_load(cur, wp, sg, zgp, hoff, b0 * V4_KB, group_shift);
#pragma unroll
    for (int d = 1; d <= VS_PF; ++d) {
        if (b0 + d < b1) {
            i4_prefetch(wp + V4_UNIT * d);
            i4_prefetch(wp + V4_UNIT * d + 32);
        }
    }
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

    for (int r = 0; r < per; ++r) {
        const int b = b0 + r;
        vs_stage<TW, WK, NT>(base, x, x_stride, r + 1, per, KB, rows, M);
        if (b + 1 + VS_PF < b1) {
            i4_prefetch(wp + V4_UNIT * (r + 1 + VS_PF));
            i4_prefetch(wp + V4_UNIT * (r + 1 + VS_PF) + 32);
        }
        VsBlock nxt = cur;
        if (b + 1 < b1) vs_load(nxt, wp + V4_UNIT * (r + 1), sg, zgp, hoff, (b + 1) * V4_KB, group_shift);
        i4_wait<1>();  // this round's x (the group before the one just committed)
        __syncthreads();
        if (b < b1) {
            const unsigned int xs = base + 16u * (unsigned int)(((r & 1) * WK + ks) * SLICE + g * 16);
#pragma unroll
            for (int j = 0; j < 2; ++j) {  // half j: k-steps 4 j .. 4 j + 3, inputs 64 j ..
                const uint4 w = j ? cur.w1 : cur.w0;
                const I4Zero zg = i4_zero(j ? cur.z1g : cur.z0g), zh = i4_zero(j ? cur.z1h : cur.z0h);
                float t[NT][4];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) t[nt][0] = t[nt][1] = t[nt][2] = t[nt][3] = 0.f;
#pragma unroll
                for (int i2 = 0; i2 < 2; ++i2) {  // k-steps 4 j + 2 i2 (even) and + 1 (odd)
                    unsigned int a0[4], a1[4];
                    v4_dequant(i4_word(w, 2 * i2), zg, zh, lo, a0);
                    v4_dequant(i4_word(w, 2 * i2 + 1), zg, zh, lo, a1);
                    const unsigned int off = 16u * (unsigned int)((4 * (2 * j + i2) + c) ^ swz);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        if (nt < used) {  // warp-uniform
                            const uint4 xv = v4_lds(xs + 16u * 128u * nt + off);  // row 8 nt + g
                            v4_mma(t[nt], a0, xv.x, xv.y);  // even k-step: inputs 8 c + 0..3
                            v4_mma(t[nt], a1, xv.z, xv.w);  // odd: 8 c + 4..7
                        }
                    }
                }
                const float sgj = j ? cur.s1g : cur.s0g, shj = j ? cur.s1h : cur.s0h;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    acc[nt][0] = fmaf(sgj, t[nt][0], acc[nt][0]);  // channel g, rows 8 nt + 2c, + 1
                    acc[nt][1] = fmaf(sgj, t[nt][1], acc[nt][1]);
                    acc[nt][2] = fmaf(shj, t[nt][2], acc[nt][2]);  // channel g + 8
                    acc[nt][3] = fmaf(shj, t[nt][3], acc[nt][3]);
                }
            }
        }
        __syncthreads();  // buffer r & 1 is free for round r + 2's stage
        cur = nxt;
    }
    v4_griddep_launch_dependents();
    if (WK > 1) {
        float* red = reinterpret_cast<float*>(vs_smem);  // [WK][TW][NT][4][32]; x's buffers are free
        i4_skinny_put<TW, NT>(acc, red, ks, tw, lane);
        __syncthreads();
        if (ks != 0) return;
        i4_skinny_add<TW, WK, NT>(acc, red, tw, lane);
    }
    if (tile_raw >= tiles) return;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int m = 8 * nt + 2 * c + (j & 1);
            const int n = j < 2 ? ch : ch + 8;
            if (m < M) y[m * y_stride + n] = from_f(acc[nt][j]);
        }
}

// v4_skinny_t{TW}_w{WK}_n{NT}: as round 3's mma_skinny_* (the same block shapes, 256
// threads); cuda/int4_v4_gemv.py's SKINNY_VARIANTS lists the set.
#define HR_VS_MIN_BLOCKS(NT) ((NT) == 4 ? 2 : 1)
#define HR_VS_KERNEL(TW, WK, NT)                                                           \
    extern "C" __global__ void __launch_bounds__(TW * WK * 32, HR_VS_MIN_BLOCKS(NT))       \
        v4_skinny_t##TW##_w##WK##_n##NT(HR_V4_ARGS) {                                      \
        v4_skinny<TW, WK, NT>(HR_V4_PASS);                                                 \
    }
HR_VS_KERNEL(8, 1, 4)
HR_VS_KERNEL(4, 2, 4)
HR_VS_KERNEL(2, 4, 4)
HR_VS_KERNEL(8, 1, 8)
HR_VS_KERNEL(4, 2, 8)
HR_VS_KERNEL(2, 4, 8)

// v4_dequant_rows: W -> [N, K] in the activation dtype from the stream layout (prefill's
// cuBLAS path): one thread per 8 inputs of a channel, written as one 16-byte vector.
// Inputs 8 c' .. 8 c' + 7 of k-step pair p (c' = c) are, for k-step 2 p + e, elements
// 4 e + 2 (s >> 1) + h: word (2 p + e) % 4 of lane 4 g + c's vector (2 p + e) / 4.
extern "C" __global__ void __launch_bounds__(256) v4_dequant_rows(
    const unsigned int* __restrict__ qv, const __half* __restrict__ scales,
    const unsigned char* __restrict__ zeros, elem_t* __restrict__ w, int N, int K, int group_shift) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int words = K / 8;
    if (idx >= (long long)N * words) return;
    const int n = (int)(idx / words), k0 = (int)(idx % words) * 8;
    const int G = K >> group_shift;
    const float s = __half2float(scales[(long long)n * G + (k0 >> group_shift)]);
    const float z = (float)zeros[(long long)n * G + (k0 >> group_shift)];
    const int r = n % 16, g = r & 7, hi = r >> 3;
    const int kk = k0 % V4_KB, p = kk / 32, c = (kk % 32) / 8;
    const long long unit = (long long)(n / 16) * (K / V4_KB) + k0 / V4_KB;
    __align__(16) elem_t out[8];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int ks = 2 * p + e;
        const unsigned int word = qv[(unit * V4_UNIT + 32 * (ks / 4) + 4 * g + c) * 4 + ks % 4];
#pragma unroll
        for (int o = 0; o < 4; ++o) {  // element 4 e + o: s = hi + 2 (o >> 1), h = o & 1
            const int nib = hi + 2 * (o >> 1) + 4 * (o & 1);
            out[4 * e + o] = from_f(((float)((word >> (4 * nib)) & 0xF) - z) * s);
        }
    }
    *reinterpret_cast<uint4*>(w + (long long)n * K + k0) = *reinterpret_cast<const uint4*>(out);
}
