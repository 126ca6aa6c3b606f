// W4A16 split-K decode GEMV on the rows layout (cuda/int4_gemm.cu draws it), for up to 8
// rows of x in one launch. Compiled by NVRTC; HR_BF16 picks the activation dtype, HR_SK_M
// the x row count the module's kernels are instantiated for.
//
// Work split: a block of 8 warps owns RB = ROWS * (8 / WK) output channels and one K slice
// (blockIdx.y of `splits`, `chunks_per_split` chunks of 32 inputs). Inside the block the
// WK warps of a row group split the slice again: lane t of WK * 32 takes chunks t,
// t + WK * 32, ... Each thread loads ROWS x U (= 8 / ROWS, at least 1) 16-byte weight
// vectors, and their scales and zero points, before any math: ~128 bytes in flight per
// thread, what HBM latency asks for. Weights bypass L1 (ld.global.nc.L1::no_allocate) so
// they do not evict anything.
//
// x: the block's slice is staged once in shared memory as fp32, odd inputs of each word
// pre-multiplied by 16, with per-chunk sums C = sum(stored) and X = sum(x). Then a nibble
// becomes a float with one shift and one LOP3, no conversion instruction:
//   even nibble j of word w sits at bits 16..19 after a shift: 0x3F800000 | n<<16 = 1 + n/128
//   odd  nibble            at bits 12..15:                 0x3F800000 | n<<12 = 1 + n/2048
// so sum(stored * f) = C + sum(x n) / 128, and per chunk y += s (128 (dot - C) - z X).
// (fp32 keeps the cancellation error near 1e-4 of the chunk's |x| sum, far below bf16's.)
//
// Splits > 1: each block writes fp32 partials part[split][m][n]; the last block of a
// channel tile to finish (a per-tile counter) sums them in split order, deterministically,
// writes y, and resets the counter for the next launch (CUDA graphs replay it as is).

#include "elem2_type.cuh"  // elem_t, elem2_t, to_f2, from_f for HR_BF16

constexpr int SK_WARPS = 8;
constexpr int SK_THREADS = 256;  // SK_WARPS x 32
constexpr int SK_CHUNK = 32;     // inputs per 16-byte weight vector
constexpr unsigned int ONE = 0x3F800000u;

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ float fl(unsigned int bits) { return __uint_as_float(bits); }

// acc + sum_j f(nibble j) * xs[j] over the 8 nibbles of w (see the header for f).
__device__ __forceinline__ float dot8(unsigned int w, const float4 lo, const float4 hi, float acc) {
    acc = fmaf(fl(((w << 16) & 0x000F0000u) | ONE), lo.x, acc);
    acc = fmaf(fl(((w << 8) & 0x0000F000u) | ONE), lo.y, acc);
    acc = fmaf(fl(((w << 8) & 0x000F0000u) | ONE), lo.z, acc);
    acc = fmaf(fl((w & 0x0000F000u) | ONE), lo.w, acc);
    acc = fmaf(fl((w & 0x000F0000u) | ONE), hi.x, acc);
    acc = fmaf(fl(((w >> 8) & 0x0000F000u) | ONE), hi.y, acc);
    acc = fmaf(fl(((w >> 8) & 0x000F0000u) | ONE), hi.z, acc);
    acc = fmaf(fl(((w >> 16) & 0x0000F000u) | ONE), hi.w, acc);
    return acc;
}

__device__ __forceinline__ unsigned int word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Shared memory: xs float4 [M][8 quads][nc] (quad q of chunk c = inputs 4q .. 4q + 3;
// lanes read consecutive chunks: conflict-free), then cx float2 [M][nc] = (C, X).
// One thread per (m, chunk): fixed summation order, so results are deterministic.
__device__ __forceinline__ void stage_x(const elem_t* __restrict__ x, long long x_stride, int Mr,
                                        int c_lo, int nc, float4* xs, float2* cx) {
    for (int i = threadIdx.x; i < Mr * nc; i += SK_THREADS) {
        const int m = i / nc, c = i % nc;
        const uint4* src = reinterpret_cast<const uint4*>(x + m * x_stride + (long long)(c_lo + c) * SK_CHUNK);
        float C = 0.f, X = 0.f;
#pragma unroll
        for (int h = 0; h < 4; ++h) {  // 8 inputs = one word's worth
            const uint4 u = __ldg(src + h);
            const elem2_t* e = reinterpret_cast<const elem2_t*>(&u);
            float f[8];
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const float2 v = to_f2(e[p]);
                f[2 * p] = v.x;
                f[2 * p + 1] = v.y * 16.f;  // odd inputs: the 2^-11 nibble position
                X += v.x + v.y;
            }
#pragma unroll
            for (int p = 0; p < 8; ++p) C += f[p];
            xs[(m * 8 + 2 * h) * nc + c] = make_float4(f[0], f[1], f[2], f[3]);
            xs[(m * 8 + 2 * h + 1) * nc + c] = make_float4(f[4], f[5], f[6], f[7]);
        }
        cx[m * nc + c] = make_float2(C, X);
    }
}

#define HR_SK_ARGS                                                                              \
    const elem_t *__restrict__ x, long long x_stride, const uint4 *__restrict__ qw,          \
        const __half *__restrict__ scales, const unsigned char *__restrict__ zeros,             \
        elem_t *__restrict__ y, long long y_stride, int N, int K, int group_size, int Mr,     \
        int chunks_per_split, float *__restrict__ part, int *__restrict__ counters
#define HR_SK_PASS \
    x, x_stride, qw, scales, zeros, y, y_stride, N, K, group_size, Mr, chunks_per_split, part, counters

// The sum of a tile's RB x M outputs over its warps; then y, or a partial + the last-block sum.
template <int M, int ROWS, int WK>
__device__ __forceinline__ void finish(float (&acc)[M][ROWS], HR_SK_ARGS) {
    constexpr int RB = ROWS * (SK_WARPS / WK);
    static_assert(RB * M <= SK_THREADS, "one thread per output of the tile");
    __shared__ float red[SK_WARPS][ROWS * M];
    __shared__ int last;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float v = acc[m][r];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == 0) red[warp][r * M + m] = v;
        }
    __syncthreads();
    const int splits = gridDim.y;
    const int t = threadIdx.x;  // t < RB * M: output (row t / M of the tile, m = t % M)
    const int n = blockIdx.x * RB + t / M, m = t % M;
    const bool mine = t < RB * M && n < N && m < Mr;
    float v = 0.f;
    if (t < RB * M) {
        const int wr = (t / M) / ROWS, r = (t / M) % ROWS;
#pragma unroll
        for (int k = 0; k < WK; ++k) v += red[wr * WK + k][r * M + m];
    }
    if (splits == 1) {
        if (mine) y[m * y_stride + n] = from_f(v);
        return;
    }
    if (mine) part[((long long)blockIdx.y * Mr + m) * N + n] = v;
    __threadfence();
    __syncthreads();
    if (t == 0) last = atomicAdd(counters + blockIdx.x, 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (mine) {
        float s = 0.f;
        for (int i = 0; i < splits; ++i) s += __ldcg(part + ((long long)i * Mr + m) * N + n);
        y[m * y_stride + n] = from_f(s);
    }
    if (t == 0) counters[blockIdx.x] = 0;
}

template <int M, int ROWS, int WK>
__device__ __forceinline__ void gemv_sk(HR_SK_ARGS) {
    constexpr int U = ROWS >= 8 ? 1 : 8 / ROWS;  // chunks per thread loaded together
    constexpr int TK = WK * 32;                  // threads along K for one row group
    extern __shared__ float4 smem[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wr = warp / WK, t = (warp % WK) * 32 + lane;
    const int C = K / SK_CHUNK, G = K / group_size, cpg = group_size / SK_CHUNK;
    const int c_lo = blockIdx.y * chunks_per_split;
    const int nc = min(chunks_per_split, C - c_lo);
    const int n0 = blockIdx.x * (ROWS * (SK_WARPS / WK)) + wr * ROWS;
    // Rows past N (the last tile) re-read row N - 1; their outputs are not written.
    const int nb = min(n0, N - 1);
    const uint4* wbase = qw + (long long)nb * C + c_lo;
    const __half* sbase = scales + (long long)nb * G;
    const unsigned char* zbase = zeros + (long long)nb * G;
    uint4 wv[U][ROWS];
    float sc[U][ROWS], zz[U][ROWS];
    auto load = [&](int cb) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = cb + u * TK;
            const int g = (c_lo + min(c, nc - 1)) / cpg;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const int dr = min(n0 + r, N - 1) - nb;
                if (c < nc) wv[u][r] = ld_stream(wbase + dr * C + c);
                sc[u][r] = __half2float(__ldg(sbase + dr * G + g));
                zz[u][r] = (float)__ldg(zbase + dr * G + g);
            }
        }
    };
    load(t);  // the first weights are in flight while x is staged
    float4* xs = smem;
    float2* cx = reinterpret_cast<float2*>(smem + Mr * 8 * nc);
    stage_x(x, x_stride, Mr, c_lo, nc, xs, cx);
    __syncthreads();
    float acc[M][ROWS];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[m][r] = 0.f;
    for (int cb = t; cb < nc; cb += U * TK) {
        if (cb != t) load(cb);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = cb + u * TK;
            if (c >= nc) continue;
            float dot[M][ROWS];
#pragma unroll
            for (int m = 0; m < M; ++m)
#pragma unroll
                for (int r = 0; r < ROWS; ++r) dot[m][r] = 0.f;
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // word i: inputs 8i .. 8i + 7 = quads 2i, 2i + 1
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    const int mm = min(m, Mr - 1);  // rows past Mr repeat the last (not written)
                    const float4 lo = xs[(mm * 8 + 2 * i) * nc + c];
                    const float4 hi = xs[(mm * 8 + 2 * i + 1) * nc + c];
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) dot[m][r] = dot8(word_of(wv[u][r], i), lo, hi, dot[m][r]);
                }
            }
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const float2 s = cx[min(m, Mr - 1) * nc + c];
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
                    acc[m][r] = fmaf(sc[u][r], fmaf(128.f, dot[m][r] - s.x, -zz[u][r] * s.y), acc[m][r]);
            }
        }
    }
    finish<M, ROWS, WK>(acc, HR_SK_PASS);
}

// gemv_sk_m{M}_r{ROWS}_w{WK}; cuda/int4_gemv.py's VARIANTS lists the same set.
#define HR_SK_KERNEL(M, R, W)                                                                         \
    extern "C" __global__ void __launch_bounds__(SK_THREADS) gemv_sk_m##M##_r##R##_w##W(HR_SK_ARGS) { \
        gemv_sk<M, R, W>(HR_SK_PASS);                                                                 \
    }
// The rule (cuda/int4_gemv.py) picks among these; the bench measures each on M = 1. One
// module per M_T (HR_SK_M), so each compiles on its own (in parallel: scripts/warm_kernels.py).
#if HR_SK_M == 1
HR_SK_KERNEL(1, 2, 8) HR_SK_KERNEL(1, 4, 8) HR_SK_KERNEL(1, 2, 4) HR_SK_KERNEL(1, 4, 4)
HR_SK_KERNEL(1, 8, 4) HR_SK_KERNEL(1, 8, 2)
#elif HR_SK_M == 2
HR_SK_KERNEL(2, 4, 4) HR_SK_KERNEL(2, 8, 4) HR_SK_KERNEL(2, 8, 2)
#elif HR_SK_M == 4
HR_SK_KERNEL(4, 2, 4) HR_SK_KERNEL(4, 4, 4) HR_SK_KERNEL(4, 4, 8)
#elif HR_SK_M == 8
HR_SK_KERNEL(8, 2, 4) HR_SK_KERNEL(8, 2, 8)
#else
#error "HR_SK_M must be 1, 2, 4 or 8"
#endif
