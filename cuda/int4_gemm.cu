// W4A16 kernels for headrace (compiled at run time by NVRTC, see cuda/compiler.py).
//
// Macros per compiled module: HR_BF16 (1: activations __nv_bfloat16, 0: __half).
//
// Weight layout (repacked at load from AWQ or GPTQ, see cuda/int4_gemm.py):
//   qw      uint32 [N, K / 8]   row n = output channel, nibble j of word w = input k = 8w + j
//   scales  __half [N, G]       G = K / group_size groups along K
//   zeros   uint8  [N, G]       4-bit zero points (0..15)
//   W[n, k] = (q - zeros[n, k / gs]) * scales[n, k / gs]
//
// gemv_m{1,2,4}: y[m, n] = sum_k x[m, k] W[n, k] for M <= 4 rows of x (decode). One warp owns
//   ROWS output channels (4; 2 for M = 4, for registers); each lane reads 16 bytes (32 weights of one group) per channel and
//   step, so a warp step covers 1024 inputs; x is read once per warp step and reused for all
//   ROWS channels. Per lane and group: sum(x * q) and sum(x) in fp32, then
//   y += s * (sum(x q) - z * sum(x)), which is the dequantized dot product exactly up to
//   fp32 rounding. Nibbles become floats through the 0x6400 (1024.0 in fp16) trick: exact.
// dequant: W -> [N, K] in the activation dtype, for prefill GEMMs through cuBLAS.

#include "elem2_type.cuh"  // elem_t, elem2_t, to_f2, from_f for HR_BF16

constexpr int WARP = 32;
constexpr int WARPS = 4;          // warps per block
constexpr int PER_LANE = 32;      // weights per lane per step (one uint4)

// Two nibbles (bits 0-3 and 16-19 of v after shifting) as exact floats.
__device__ __forceinline__ float2 nib2(unsigned int v) {
    const unsigned int h = (v & 0x000F000Fu) | 0x64006400u;  // fp16 pair 1024 + n
    __half2 t = *reinterpret_cast<const __half2*>(&h);
    t = __hsub2(t, __half2(__float2half(1024.f), __float2half(1024.f)));
    return __half22float2(t);
}

// 8 weights of one word, in k order: nibble j = input 8w + j.
__device__ __forceinline__ void unpack_word(unsigned int w, float (&f)[8]) {
    // nib2(w >> s) yields nibbles s/4 and s/4 + 4.
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const float2 p = nib2(w >> (4 * s));
        f[s] = p.x;
        f[s + 4] = p.y;
    }
}

template <int M, int ROWS>  // ROWS: output channels per warp
__device__ __forceinline__ void gemv_impl(
    const elem_t* __restrict__ x, long long x_stride, const uint4* __restrict__ qw,
    const __half* __restrict__ scales, const unsigned char* __restrict__ zeros, elem_t* __restrict__ y,
    long long y_stride, int N, int K, int group_size) {
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
    const int n0 = (blockIdx.x * WARPS + warp) * ROWS;
    if (n0 >= N) return;
    const int words4 = K / PER_LANE;  // uint4 per weight row
    const int G = K / group_size;

    float acc[M][ROWS];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[m][r] = 0.f;

    for (int c = lane; c < words4; c += WARP) {
        const int k0 = c * PER_LANE;
        const int g = k0 / group_size;
        uint4 wv[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int n = min(n0 + r, N - 1);
            wv[r] = __ldg(qw + (long long)n * words4 + c);
        }
        float dot[M][ROWS], xsum[M];
#pragma unroll
        for (int m = 0; m < M; ++m) {
            xsum[m] = 0.f;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) dot[m][r] = 0.f;
        }
        // Word w of each channel's uint4 covers inputs k0 + 8w .. k0 + 8w + 7: one uint4 of x.
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            float xf[M][8];
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const uint4 u = __ldg(reinterpret_cast<const uint4*>(x + m * x_stride + k0 + 8 * w));
                const elem2_t* e = reinterpret_cast<const elem2_t*>(&u);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float2 f = to_f2(e[i]);
                    xf[m][2 * i] = f.x;
                    xf[m][2 * i + 1] = f.y;
                    xsum[m] += f.x + f.y;
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const unsigned int word = w == 0 ? wv[r].x : w == 1 ? wv[r].y : w == 2 ? wv[r].z : wv[r].w;
                float q[8];
                unpack_word(word, q);
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int m = 0; m < M; ++m) dot[m][r] = fmaf(xf[m][j], q[j], dot[m][r]);
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int n = min(n0 + r, N - 1);
            const float s = __half2float(scales[(long long)n * G + g]);
            const float z = (float)zeros[(long long)n * G + g];
#pragma unroll
            for (int m = 0; m < M; ++m) acc[m][r] = fmaf(s, dot[m][r] - z * xsum[m], acc[m][r]);
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int off = WARP / 2; off > 0; off >>= 1)
                acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], off);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (n0 + r < N) {
#pragma unroll
                for (int m = 0; m < M; ++m) y[m * y_stride + n0 + r] = from_f(acc[m][r]);
            }
        }
    }
}

#define HR_GEMV_ARGS                                                                          \
    const elem_t *__restrict__ x, long long x_stride, const uint4 *__restrict__ qw,           \
        const __half *__restrict__ scales, const unsigned char *__restrict__ zeros,                 \
        elem_t *__restrict__ y, long long y_stride, int N, int K, int group_size
#define HR_GEMV_PASS x, x_stride, qw, scales, zeros, y, y_stride, N, K, group_size

// gemv_m{M}: ROWS channels per warp (2 for M = 4, for registers); int4_gemm.py's
// ROWS_PER_BLOCK says ROWS x WARPS.
#define HR_GEMV_KERNEL(M, ROWS)                                                               \
    extern "C" __global__ void __launch_bounds__(WARP* WARPS) gemv_m##M(HR_GEMV_ARGS) {       \
        gemv_impl<M, ROWS>(HR_GEMV_PASS);                                                     \
    }
HR_GEMV_KERNEL(1, 4)
HR_GEMV_KERNEL(2, 4)
HR_GEMV_KERNEL(4, 2)

// ---- tiles layout: tensor-core GEMV (cuda/int4_tiles.py draws the layout) ---------------
//
// gemv_tiles: y[m, n] for M <= 8 rows of x in one launch. A block owns one 16-channel tile
// row and TILE_WARPS warps split its K (split-K; a shared-memory sum at the end), so even
// N = 4096 runs 256 x 8 warps. Per 16 x 64 tile a lane loads one uint4 of weights (TILE_U
// tiles in flight) and two uint4 of x (the layout permutes K inside a tile so that lane
// 4g + c's inputs are 16c .. 16c + 15: mma sums over k, so A and B only need the same
// order), makes each nibble pair an exact 16-bit (q - z) with one LOP3 and one HSUB2
// (0x4300 | q is bf16 128 + q; 0x6400 | q is fp16 1024 + q), and runs 4 mma.m16n8k16
// (A = W tile, B = x^T, fp32 accumulate; x times a small integer is exact). A 64-wide tile
// lies in one group (group_size % 64 == 0), so its sum is scaled once:
// y += s * sum(x (q - z)), the rows kernels' math.
// dequant_tiles: W -> [N, K] from the tiles layout, for prefill GEMMs.

constexpr int TILE_WARPS = 8;  // warps per block: the K split
constexpr int TILE_U = 8;      // tiles per lane loaded before the math (bytes in flight)

#if HR_BF16
constexpr unsigned int MAGIC = 0x4300u;  // bf16 128.0
#define HR_MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
#else
constexpr unsigned int MAGIC = 0x6400u;  // fp16 1024.0
#define HR_MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
#endif

// a + b on two 16-bit lanes as one FMA (a * 1 + b): __hsub2 on bf16 costs ~2.5 instructions.
__device__ __forceinline__ unsigned int add2(unsigned int a, unsigned int b) {
    unsigned int d;
#if HR_BF16
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0x3F803F80u), "r"(b));
#else
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0x3C003C00u), "r"(b));
#endif
    return d;
}

// -(MAGIC + z) on both 16-bit lanes: added to MAGIC | q it leaves q - z, exactly.
__device__ __forceinline__ unsigned int neg_zero2(unsigned char z) {
    return ((MAGIC + z) * 0x10001u) ^ 0x80008000u;
}

__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned int (&a)[4], unsigned int b0,
                                         unsigned int b1) {
    asm volatile(HR_MMA " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One tile: 4 k-steps of mma into t (zeroed by the caller). Word i of w is k-step i; xa
// and xb hold the lane's 16 inputs (k-step i: inputs 4i .. 4i + 3 = b0, b1).
__device__ __forceinline__ void tile_mma(float (&t)[4], uint4 w, unsigned int z0, unsigned int z1,
                                         uint4 xa, uint4 xb) {  // z0, z1: neg_zero2
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const unsigned int word = i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w;
        unsigned int a[4];
#pragma unroll
        for (int s = 0; s < 4; ++s)
            a[s] = add2(((word >> (4 * s)) & 0x000F000Fu) | (MAGIC * 0x10001u), (s & 1) ? z1 : z0);
        const unsigned int b0 = i == 0 ? xa.x : i == 1 ? xa.z : i == 2 ? xb.x : xb.z;
        const unsigned int b1 = i == 0 ? xa.y : i == 1 ? xa.w : i == 2 ? xb.y : xb.w;
        mma16816(t, a, b0, b1);
    }
}

extern "C" __global__ void __launch_bounds__(WARP* TILE_WARPS) gemv_tiles(
    const elem_t* __restrict__ x, long long x_stride, const uint4* __restrict__ qt,
    const __half* __restrict__ scales, const unsigned char* __restrict__ zeros, elem_t* __restrict__ y,
    long long y_stride, int N, int K, int group_size, int M) {
    __shared__ float red[TILE_WARPS][4][WARP];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int g = lane >> 2, c = lane & 3;
    const int tiles_k = K / 64, G = K / group_size;
    const int ch0 = blockIdx.x * 16 + g, ch1 = ch0 + 8;
    const int per = (tiles_k + TILE_WARPS - 1) / TILE_WARPS;
    const int t0 = warp * per, t1 = min(tiles_k, t0 + per);
    const uint4* wp = qt + (long long)blockIdx.x * tiles_k * WARP + lane;
    // B column g is row g of x; lanes past the last row read row 0 again: C's column m only
    // depends on B's column m, and columns >= M are not written.
    const uint4* xr = reinterpret_cast<const uint4*>(x + (long long)(g < M ? g : 0) * x_stride + 16 * c);
    const __half* s_row0 = scales + (long long)ch0 * G;
    const __half* s_row1 = scales + (long long)ch1 * G;
    const unsigned char* z_row0 = zeros + (long long)ch0 * G;
    const unsigned char* z_row1 = zeros + (long long)ch1 * G;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    // The warp walks its tiles in order: groups change every tpg tiles (no division per tile).
    const int tpg = group_size / 64;
    int gi = t0 / tpg, g_end = (gi + 1) * tpg;
    float s0 = 0.f, s1 = 0.f;
    unsigned int z0 = 0, z1 = 0;
    if (t0 < t1) {
        s0 = __half2float(s_row0[gi]);
        s1 = __half2float(s_row1[gi]);
        z0 = neg_zero2(z_row0[gi]);
        z1 = neg_zero2(z_row1[gi]);
    }
    for (int tk = t0; tk < t1; tk += TILE_U) {
        uint4 wv[TILE_U];
#pragma unroll
        for (int u = 0; u < TILE_U; ++u)
            if (tk + u < t1) wv[u] = __ldg(wp + (tk + u) * WARP);
#pragma unroll
        for (int u = 0; u < TILE_U; ++u) {
            if (tk + u < t1) {
                const int kb = (tk + u) * 64;
                if (tk + u == g_end) {  // a new group: its scales and zero points
                    ++gi;
                    g_end += tpg;
                    s0 = __half2float(s_row0[gi]);
                    s1 = __half2float(s_row1[gi]);
                    z0 = neg_zero2(z_row0[gi]);
                    z1 = neg_zero2(z_row1[gi]);
                }
                const uint4 xa = __ldg(xr + kb / 8), xb = __ldg(xr + kb / 8 + 1);
                float t[4] = {0.f, 0.f, 0.f, 0.f};
                tile_mma(t, wv[u], z0, z1, xa, xb);
                acc[0] = fmaf(s0, t[0], acc[0]);  // C frag: (row g, col 2c), (g, 2c + 1),
                acc[1] = fmaf(s0, t[1], acc[1]);  //          (g + 8, 2c), (g + 8, 2c + 1)
                acc[2] = fmaf(s1, t[2], acc[2]);
                acc[3] = fmaf(s1, t[3], acc[3]);
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
        for (int w = 0; w < TILE_WARPS; ++w) v += red[w][j][lane];
        const int m = 2 * c + (j & 1);
        const int n = (j < 2) ? ch0 : ch1;
        if (m < M) y[m * y_stride + n] = from_f(v);
    }
}

// One thread per 8 consecutive inputs of row n (one 16-byte store): inputs 16c + 8h ..
// 16c + 8h + 7 of a tile are words 2h and 2h + 1 of lane 4g + c, 4 inputs a word.
extern "C" __global__ void __launch_bounds__(256) dequant_tiles(
    const unsigned int* __restrict__ qt, const __half* __restrict__ scales,
    const unsigned char* __restrict__ zeros, elem_t* __restrict__ w, int N, int K, int group_size) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int words = K / 8;
    if (idx >= (long long)N * words) return;
    const int n = (int)(idx / words);
    const int k0 = (int)(idx % words) * 8;
    const int G = K / group_size;
    const float s = __half2float(scales[(long long)n * G + k0 / group_size]);
    const float z = (float)zeros[(long long)n * G + k0 / group_size];
    const int r = n % 16, kk = k0 % 64, c = kk / 16, h = (kk % 16) / 8;
    const long long tile = (long long)(n / 16) * (K / 64) + k0 / 64;
    const unsigned int* lw = qt + (tile * WARP + (r & 7) * 4 + c) * 4;  // the lane's 4 words
    __align__(16) elem_t out[8];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const unsigned int word = lw[2 * h + i];
#pragma unroll
        for (int o = 0; o < 4; ++o) {  // input 4i + o of the word: A register s, half o % 2
            const int nib = (r >> 3) + 2 * (o >> 1) + 4 * (o & 1);
            out[4 * i + o] = from_f(((float)((word >> (4 * nib)) & 0xF) - z) * s);
        }
    }
    *reinterpret_cast<uint4*>(w + (long long)n * K + k0) = *reinterpret_cast<const uint4*>(out);
}

// One thread per word: 8 weights of row n, written as one 16-byte vector.
extern "C" __global__ void __launch_bounds__(256) dequant(
    const unsigned int* __restrict__ qw, const __half* __restrict__ scales,
    const unsigned char* __restrict__ zeros, elem_t* __restrict__ w, int N, int K, int group_size) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int words = K / 8;
    if (i >= (long long)N * words) return;
    const int n = (int)(i / words);
    const int k0 = (int)(i % words) * 8;
    const int G = K / group_size;
    const int g = k0 / group_size;
    const float s = __half2float(scales[(long long)n * G + g]);
    const float z = (float)zeros[(long long)n * G + g];
    float q[8];
    unpack_word(qw[i], q);
    __align__(16) elem_t out[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = from_f((q[j] - z) * s);
    *reinterpret_cast<uint4*>(w + (long long)n * K + k0) = *reinterpret_cast<const uint4*>(out);
}
