// FP8-weight GEMV for decode batches of 1-8 rows (weight-only: W8A16), y = (x @ w^T) * s.
//
//   x [M, K] bf16/fp16 (row stride x_stride), w [N, K] float8_e4m3fn (contiguous),
//   w_scale [N] fp32 (scale_stride 1) or [1] (scale_stride 0), bias [N] or null,
//   y [M, N] (row stride y_stride).
//
// At batch <= 8 a decode step is a weight read, so the kernel is built to keep DRAM busy:
// - a block (THREADS threads) owns R whole rows; its threads stride along K together, so
//   each thread has R * U independent 16-byte weight loads in flight per round (128 B at
//   R = 4, U = 2) and one round of a 4096-wide row needs no second trip;
// - N / R blocks (1024 for N = 4096) of 128 threads: ~8 resident per SM, so a whole
//   o_proj is in flight at once instead of in dependent rounds per warp;
// - weight loads bypass L1 (ld.global.nc.L1::no_allocate): they are read once, and L1
//   keeps x, which every block re-reads (2 * M bytes of x per R bytes of weights);
// - weights widen fp8x2 -> f16x2 -> fp32 in registers once per element and are reused for
//   all M activation rows; fp32 accumulate; the per-channel scale and bias at the end.
// Partial sums: warp shuffles, then one shared-memory pass across the block's warps.
// Requirements (fp8_gemv.py checks them): K % 16 == 0, x rows and w 16-byte aligned.

#include <cuda_fp8.h>

#include "elem2_type.cuh"  // elem_t, elem2_t, to_f, to_f2, from_f for HR_BF16

namespace hr_fp8_gemv {

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;

// Rows per block and unroll by batch size: more rows amortize the x reads at larger M.
template <int M>
struct Tile {
    static constexpr int R = M <= 4 ? 4 : 8;
    static constexpr int U = M <= 4 ? 2 : 1;
};

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// 4 FP8 weights (one 32-bit word) -> 4 floats.
__device__ __forceinline__ void widen4(unsigned word, float* f) {
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(
        static_cast<__nv_fp8x2_storage_t>(word & 0xffffu), __NV_E4M3);
    const __half2_raw hi =
        __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(word >> 16), __NV_E4M3);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&lo));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&hi));
    f[0] = a.x;
    f[1] = a.y;
    f[2] = b.x;
    f[3] = b.y;
}

// acc[r][m] += dot(w chunk of row r (16 fp8), x[m] chunk (16 elements)) for all r, m.
template <int M, int R>
__device__ __forceinline__ void chunk_fma(const uint4 (&wv)[R], const elem_t* __restrict__ x,
                                          long long x_stride, int c, float (&acc)[R][M]) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // 32-bit word q of the chunk: elements 4q .. 4q + 3
        float wf[R][4];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const unsigned word = q == 0 ? wv[r].x : q == 1 ? wv[r].y : q == 2 ? wv[r].z : wv[r].w;
            widen4(word, wf[r]);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
            // 4 activations = 8 bytes of row m at element 16c + 4q.
            const uint2 xv = __ldg(reinterpret_cast<const uint2*>(x + m * x_stride + 16 * c) + q);
            const float2 x01 = to_f2(*reinterpret_cast<const elem2_t*>(&xv.x));
            const float2 x23 = to_f2(*reinterpret_cast<const elem2_t*>(&xv.y));
#pragma unroll
            for (int r = 0; r < R; ++r) {
                float a = acc[r][m];
                a = fmaf(wf[r][0], x01.x, a);
                a = fmaf(wf[r][1], x01.y, a);
                a = fmaf(wf[r][2], x23.x, a);
                a = fmaf(wf[r][3], x23.y, a);
                acc[r][m] = a;
            }
        }
    }
}

// Grid (ceil(N / R)), THREADS threads.
template <int M>
__device__ __forceinline__ void gemv(const elem_t* __restrict__ x, long long x_stride,
                                     const unsigned char* __restrict__ w,
                                     const float* __restrict__ w_scale, int scale_stride,
                                     const elem_t* __restrict__ bias, elem_t* __restrict__ y,
                                     long long y_stride, int N, int K) {
    constexpr int R = Tile<M>::R;
    constexpr int U = Tile<M>::U;
    __shared__ float partial[WARPS][R * M];
    const int n0 = blockIdx.x * R;
    const int chunks = K / 16;
    const uint4* wrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int n = min(n0 + r, N - 1);  // a block's missing last rows re-read row N - 1
        wrow[r] = reinterpret_cast<const uint4*>(w + static_cast<long long>(n) * K);
    }
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

    for (int c0 = threadIdx.x; c0 < chunks; c0 += THREADS * U) {
        uint4 wv[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u) {  // every load of the round first: bytes in flight
            const int c = c0 + u * THREADS;
#pragma unroll
            for (int r = 0; r < R; ++r)
                wv[u][r] = c < chunks ? load_stream(wrow[r] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * THREADS;
            if (c < chunks) chunk_fma<M, R>(wv[u], x, x_stride, c, acc);
        }
    }

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float a = acc[r][m];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
            if (lane == 0) partial[warp][r * M + m] = a;
        }
    __syncthreads();
    for (int i = threadIdx.x; i < R * M; i += THREADS) {
        const int r = i / M;
        const int m = i % M;
        const int n = n0 + r;
        if (n >= N) continue;
        float s = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) s += partial[v][i];
        const float b = bias != nullptr ? to_f(bias[n]) : 0.f;
        y[m * y_stride + n] = from_f(fmaf(s, w_scale[n * scale_stride], b));
    }
}

}  // namespace hr_fp8_gemv

#define HR_GEMV_ARGS                                                                        \
    const elem_t *__restrict__ x, long long x_stride, const unsigned char *__restrict__ w, \
        const float *__restrict__ w_scale, int scale_stride, const elem_t *__restrict__ bias, \
        elem_t *__restrict__ y, long long y_stride, int N, int K
#define HR_GEMV_PASS x, x_stride, w, w_scale, scale_stride, bias, y, y_stride, N, K
#define HR_GEMV_KERNEL(M)                                                                  \
    extern "C" __global__ void __launch_bounds__(hr_fp8_gemv::THREADS)                     \
        fp8_gemv_v2_m##M(HR_GEMV_ARGS) {                                                   \
        hr_fp8_gemv::gemv<M>(HR_GEMV_PASS);                                                \
    }
HR_GEMV_KERNEL(1)
HR_GEMV_KERNEL(2)
HR_GEMV_KERNEL(3)
HR_GEMV_KERNEL(4)
HR_GEMV_KERNEL(5)
HR_GEMV_KERNEL(6)
HR_GEMV_KERNEL(7)
HR_GEMV_KERNEL(8)
