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

#include <cuda_bf16.h>
#include <cuda_fp16.h>


#ifndef HR_BF16
#define HR_BF16 1
#endif

#if HR_BF16
typedef __nv_bfloat16 elem_t;
typedef __nv_bfloat162 elem2_t;
__device__ __forceinline__ float2 to_f2(elem2_t v) { return __bfloat1622float2(v); }
__device__ __forceinline__ elem_t from_f(float a) { return __float2bfloat16(a); }
#else
typedef __half elem_t;
typedef __half2 elem2_t;
__device__ __forceinline__ float2 to_f2(elem2_t v) { return __half22float2(v); }
__device__ __forceinline__ elem_t from_f(float a) { return __float2half(a); }
#endif

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

extern "C" __global__ void __launch_bounds__(WARP* WARPS) gemv_m1(HR_GEMV_ARGS) {
    gemv_impl<1, 4>(HR_GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(WARP* WARPS) gemv_m2(HR_GEMV_ARGS) {
    gemv_impl<2, 4>(HR_GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(WARP* WARPS) gemv_m4(HR_GEMV_ARGS) {
    gemv_impl<4, 2>(HR_GEMV_PASS);  // fewer channels: registers
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
