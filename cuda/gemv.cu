// Small-M GEMV for decode: y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]), M = 1..8, bf16/fp16
// (compiled at run time by NVRTC, see cuda/compiler.py; cuda/gemv.py has the reference).
//
// At decode batch sizes a linear layer is a weight read: the kernel's only job is to keep
// enough bytes of w in flight to run at copy bandwidth. Layout of the work:
//
//   grid (ceil(N / ROWS)), block THREADS (a multiple of 32, <= 256): block b owns the ROWS
//   output features [b * ROWS, b * ROWS + ROWS) for all M rows of x (ROWS: 4 for M <= 4,
//   else 2).
//   Thread t reads the 16-byte chunks c = t, t + THREADS, ... of each of its ROWS weight rows
//   (8 elements per chunk), UNROLL chunks per row at a time: ROWS * UNROLL independent
//   16-byte loads in flight per thread, streamed past L1 (ld.global.nc.L1::no_allocate) so
//   that L1 keeps x, which every block re-reads.
//   Partial sums (fp32) reduce by warp shuffles, then across the block's warps in shared
//   memory: a split of K inside the block, so there is no second reduce kernel.
//
// Each output's sum runs in the same order whatever M is, so a row's result does not depend
// on the batch it is in. Macro set per module: HR_DTYPE (1: __half, 2: __nv_bfloat16).
// Requirements (checked by the caller): K % 8 == 0, w rows and x rows 16-byte aligned.

#include "elem_type.cuh"  // elem_t, to_f, from_f for HR_DTYPE

constexpr int VEC = 8;  // elements per 16-byte chunk
// Output features per block: 4 up to M = 4, 2 beyond (acc[ROWS][M] must stay in registers).
template <int M>
struct Rows {
    static constexpr int value = M <= 4 ? 4 : 2;
};
constexpr int UNROLL = 2;  // chunks per weight row in flight per thread
constexpr int MAX_WARPS = 8;  // THREADS <= 256

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// acc += dot(w[0..7], x[0..7]) in fp32.
__device__ __forceinline__ float dot8(const uint4& w, const uint4& x, float acc) {
    const elem_t* wp = reinterpret_cast<const elem_t*>(&w);
    const elem_t* xp = reinterpret_cast<const elem_t*>(&x);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc = fmaf(to_f(wp[e]), to_f(xp[e]), acc);
    return acc;
}

template <int M>
__device__ __forceinline__ void gemv_impl(const elem_t* __restrict__ x, long long x_stride,
                                          const elem_t* __restrict__ w,
                                          const elem_t* __restrict__ bias,
                                          elem_t* __restrict__ y, long long y_stride, int N,
                                          int K) {
    constexpr int ROWS = Rows<M>::value;
    const int n0 = blockIdx.x * ROWS;
    const int chunks = K / VEC;
    const int step = blockDim.x;
    const uint4* wr[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int n = min(n0 + r, N - 1);  // a missing last row re-reads a real one
        wr[r] = reinterpret_cast<const uint4*>(w + (long long)n * K);
    }
    const uint4* xr[M];
#pragma unroll
    for (int m = 0; m < M; ++m) xr[m] = reinterpret_cast<const uint4*>(x + m * x_stride);

    float acc[ROWS][M];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;

    int c = threadIdx.x;
    for (; c + (UNROLL - 1) * step < chunks; c += UNROLL * step) {
        uint4 wv[UNROLL][ROWS];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) wv[u][r] = load_stream(wr[r] + c + u * step);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const uint4 xv = __ldg(xr[m] + c + u * step);
#pragma unroll
                for (int r = 0; r < ROWS; ++r) acc[r][m] = dot8(wv[u][r], xv, acc[r][m]);
            }
    }
    for (; c < chunks; c += step) {  // fewer than UNROLL chunks left for this thread
        uint4 wv[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) wv[r] = load_stream(wr[r] + c);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const uint4 xv = __ldg(xr[m] + c);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[r][m] = dot8(wv[r], xv, acc[r][m]);
        }
    }

    __shared__ float partial[MAX_WARPS][ROWS * M];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float v = acc[r][m];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) partial[warp][r * M + m] = v;
        }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    for (int i = threadIdx.x; i < ROWS * M; i += blockDim.x) {
        const int r = i / M;
        const int m = i - r * M;
        const int n = n0 + r;
        if (n >= N) continue;
        float s = 0.0f;
        for (int j = 0; j < warps; ++j) s += partial[j][i];
        if (bias != nullptr) s += to_f(bias[n]);
        y[m * y_stride + n] = from_f(s);
    }
}

#define HR_GEMV_ARGS                                                                   \
    const elem_t *__restrict__ x, long long x_stride, const elem_t *__restrict__ w,    \
        const elem_t *__restrict__ bias, elem_t *__restrict__ y, long long y_stride, int N, \
        int K
#define HR_GEMV_PASS x, x_stride, w, bias, y, y_stride, N, K
extern "C" __global__ void __launch_bounds__(256) gemv_m1(HR_GEMV_ARGS) {
    gemv_impl<1>(HR_GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_m2(HR_GEMV_ARGS) {
    gemv_impl<2>(HR_GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_m3(HR_GEMV_ARGS) {
    gemv_impl<3>(HR_GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_m4(HR_GEMV_ARGS) {
    gemv_impl<4>(HR_GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_m5(HR_GEMV_ARGS) {
    gemv_impl<5>(HR_GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_m6(HR_GEMV_ARGS) {
    gemv_impl<6>(HR_GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_m7(HR_GEMV_ARGS) {
    gemv_impl<7>(HR_GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_m8(HR_GEMV_ARGS) {
    gemv_impl<8>(HR_GEMV_PASS);
}
