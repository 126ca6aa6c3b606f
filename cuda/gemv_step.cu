// Decode-step GEMV, round 2 (issue 11): y[M, N] = x'[M, K] @ w[N, K]^T (+ bias) (+ residual)
// for M = 1..8 rows, bf16/fp16, compiled at run time by NVRTC (cuda/gemv_step.py: the
// launch plan and the torch references). x' is x itself, or a prologue computed by each
// block into shared memory:
//
//   gemv2_m<M>       x' = x                                          (x [M, K])
//   gemv2_norm_m<M>  x' = round(nw * round(x * rstd(x)))             (x [M, K]: RMSNorm)
//   gemv2_silu_m<M>  x' = round(round(silu(x[:, :K])) * x[:, K:])    (x [M, 2K]: gate | up)
//   gemv2_norm_pair_m<M>  the norm's x', and y = silu(x' @ gate^T) * (x' @ up^T) for w = gate | up
//                    (y [M, N/2]: the gate/up GEMV with silu_and_mul as its epilogue)
//
// with exactly the rounding of cuda/fused_ops.cu's add_rms_norm / silu_and_mul, so the fused
// step computes what the unfused one does (the norm's sum of squares runs in another order:
// rstd may differ in its last bit). The epilogue adds bias (fp32, one rounding, as
// cuda/gemv.cu) and then, where `residual` is not null, y = round(round(s) + residual):
// the residual add of the next add_rms_norm, folded in.
//
// Why not cuda/gemv.cu's layout: there a block split K over its 256 threads and owned 4 rows,
// so a 4096-wide row was one round of loads per thread, then a block-wide barrier and
// reduction, then the block exited: 1,024-1,536 short blocks in ~1.5 uneven waves, each with
// its loads, barrier and tail in series. Here the grid is one resident wave (blocks = SMs x
// blocks per SM, capped by the work) and each WARP owns R whole rows at a time: its lanes
// stride K together (lane l reads 16-byte chunks l, l + 32, ...), R * U independent 16-byte
// loads per lane in flight per round (8 x 16 B = 4 KB per warp at R = 2, U = 4), reduced by
// warp shuffles only (no barrier), then the warp takes its next R rows. Every output's sum
// runs in the same order whatever M, R, U or the grid are, so a row's result does not depend
// on the batch it is in or on the plan.
//
// Requirements (checked by the caller): K % 8 == 0, x rows, w rows (and residual, y rows)
// 16-byte aligned where read as vectors; prologue kernels: M * K elements fit the dynamic
// shared memory the launch passes (M * K * 2 bytes <= 48 KiB).
// Macros: HR_DTYPE (1: __half, 2: __nv_bfloat16), HR_R (rows per warp), HR_U (chunks per row
// in flight per lane).

#include "elem_type.cuh"  // elem_t, to_f, from_f for HR_DTYPE

#ifndef HR_R
#define HR_R 2
#endif
#ifndef HR_U
#define HR_U 4
#endif

namespace hr_gemv2 {

constexpr int R = HR_R;
constexpr int U = HR_U;
constexpr int VEC = 8;  // elements per 16-byte chunk
constexpr int WARPS = 8;
constexpr int THREADS = WARPS * 32;
static_assert(R * 8 <= 32, "R * M outputs must fit a warp's lanes");

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Programmatic Dependent Launch (HEADRACE_PDL=1, cuda/compiler.py launch(pdl=True)): a kernel
// so launched may start while the previous kernel of the stream still runs; everything
// before griddep_wait() touches only the weights (never written by a kernel), everything
// that reads x / residual or writes y comes after it. Launched without the attribute, the
// wait returns at once. griddep_launch_dependents() lets the next PDL kernel start its own
// weight prefetch during this one's tail.
__device__ __forceinline__ void griddep_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void griddep_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// acc += dot(w[0..7], x[0..7]) in fp32.
__device__ __forceinline__ float dot8(const uint4& w, const uint4& x, float acc) {
    const elem_t* wp = reinterpret_cast<const elem_t*>(&w);
    const elem_t* xp = reinterpret_cast<const elem_t*>(&x);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc = fmaf(to_f(wp[e]), to_f(xp[e]), acc);
    return acc;
}

// Weight row r of row group t: RR consecutive rows, or (PAIR: gate/up) rows t and t + N/2.
template <int RR, bool PAIR>
__device__ __forceinline__ int row_of(int t, int r, int N) {
    return PAIR ? t + r * (N >> 1) : min(t * RR + r, N - 1);  // a missing last row: a real one
}

template <int RR, bool PAIR>
__device__ __forceinline__ int row_groups(int N) {
    return PAIR ? N >> 1 : (N + RR - 1) / RR;
}

// Warm L2 with the first rounds of this warp's first rows while the prologue (or, under PDL,
// the previous kernel) runs: the SiLU prologue is issue-bound (~2 us per block at K = 14336:
// every block computes the whole activation), so HBM keeps streaming meanwhile. Up to
// MAX_ROUNDS rounds, within ~16 MiB over the grid so the lines are still in L2 when read
// (one round for the 8B shapes' single-row warps: 4 KB x 4,096 warps).
template <int MAX_ROUNDS, int RR, bool PAIR>
__device__ __forceinline__ void prefetch_first_rows(const elem_t* w, int N, int K) {
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int chunks = K / VEC;
    const long long round_bytes = (long long)gridDim.x * WARPS * RR * U * 32 * 16;
    const int rounds = max(1, min(MAX_ROUNDS, (int)((16ll << 20) / round_bytes)));
    if (t >= row_groups<RR, PAIR>(N)) return;
#pragma unroll
    for (int r = 0; r < RR; ++r) {
        const int n = row_of<RR, PAIR>(t, r, N);
        const uint4* row = reinterpret_cast<const uint4*>(w + (long long)n * K);
#pragma unroll 4
        for (int u = 0; u < U * rounds; ++u) {
            const int c = lane + u * 32;
            if (c >= chunks) break;
            if ((c & 7) == 0) prefetch_l2(row + c);  // one per 128-byte line
        }
    }
}

// RMSNorm of M rows into shared memory: xs[m * chunks + c] (fused_ops.cu add_rms_norm's
// math, without the residual add: x already is the sum).
template <int M>
__device__ __forceinline__ void norm_prologue(const elem_t* __restrict__ x, long long x_stride,
                                              const elem_t* __restrict__ nw, float eps, int K,
                                              uint4* xs) {
    __shared__ float red[WARPS][M];
    const int chunks = K / VEC;
    float ss[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        ss[m] = 0.0f;
        const uint4* row = reinterpret_cast<const uint4*>(x + m * x_stride);
        for (int c = threadIdx.x; c < chunks; c += THREADS) {
            const uint4 v = __ldg(row + c);
            const elem_t* e = reinterpret_cast<const elem_t*>(&v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) ss[m] = fmaf(to_f(e[i]), to_f(e[i]), ss[m]);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss[m] += __shfl_xor_sync(0xffffffffu, ss[m], o);
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5][m] = ss[m];
    }
    __syncthreads();
    const uint4* wn = reinterpret_cast<const uint4*>(nw);
#pragma unroll
    for (int m = 0; m < M; ++m) {
        float total = 0.0f;
#pragma unroll
        for (int j = 0; j < WARPS; ++j) total += red[j][m];
        const float rstd = rsqrtf(__fadd_rn(__fmul_rn(total, 1.0f / (float)K), eps));
        const uint4* row = reinterpret_cast<const uint4*>(x + m * x_stride);
        for (int c = threadIdx.x; c < chunks; c += THREADS) {
            const uint4 v = __ldg(row + c);
            const uint4 g = __ldg(wn + c);
            const elem_t* h = reinterpret_cast<const elem_t*>(&v);
            const elem_t* wv = reinterpret_cast<const elem_t*>(&g);
            uint4 o;
            elem_t* op = reinterpret_cast<elem_t*>(&o);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float n = to_f(from_f(__fmul_rn(to_f(h[i]), rstd)));
                op[i] = from_f(__fmul_rn(to_f(wv[i]), n));
            }
            xs[m * chunks + c] = o;
        }
    }
    __syncthreads();
}

// silu(gate) * up of M rows of [gate | up] (2K wide) into shared memory (fused_ops.cu's
// silu_and_mul math: torch's silu, IEEE division and expf, two roundings).
template <int M>
__device__ __forceinline__ void silu_prologue(const elem_t* __restrict__ x, long long x_stride,
                                              int K, uint4* xs) {
    const int chunks = K / VEC;
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const uint4* gate = reinterpret_cast<const uint4*>(x + m * x_stride);
        for (int c = threadIdx.x; c < chunks; c += THREADS) {
            const uint4 gv = __ldg(gate + c);
            const uint4 uv = __ldg(gate + chunks + c);
            const elem_t* g = reinterpret_cast<const elem_t*>(&gv);
            const elem_t* u = reinterpret_cast<const elem_t*>(&uv);
            uint4 o;
            elem_t* op = reinterpret_cast<elem_t*>(&o);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float gf = to_f(g[i]);
                const float s = to_f(from_f(gf / (1.0f + expf(-gf))));
                op[i] = from_f(__fmul_rn(s, to_f(u[i])));
            }
            xs[m * chunks + c] = o;
        }
    }
    __syncthreads();
}

template <int M, bool SMEM>
__device__ __forceinline__ uint4 x_chunk(const uint4* const (&xr)[M], int m, int c) {
    return SMEM ? xr[m][c] : __ldg(xr[m] + c);
}

// y = round(round(silu(round(g))) * round(u)) for the gate / up sums of one row of x: the
// rounding of a gate/up GEMV's output followed by fused_ops.cu's silu_and_mul.
__device__ __forceinline__ elem_t silu_pair(float g, float u) {
    const float gf = to_f(from_f(g));
    const float s = to_f(from_f(gf / (1.0f + expf(-gf))));
    return from_f(__fmul_rn(s, to_f(from_f(u))));
}

// The warps' loop over row groups. xr[m]: row m of x' (global, or shared memory if SMEM).
// RR rows per group; PAIR: the group is gate row t and up row t + N/2, and the warp writes
// silu(gate) * up to y[:, t] (y is [M, N/2]; no residual).
template <int M, bool SMEM, int RR = R, bool PAIR = false>
__device__ __forceinline__ void rows_loop(const uint4* const (&xr)[M], const elem_t* __restrict__ w,
                                          const elem_t* __restrict__ bias,
                                          const elem_t* residual, long long r_stride, elem_t* y,
                                          long long y_stride, int N, int K) {
    const int lane = threadIdx.x & 31;
    const int chunks = K / VEC;
    const int groups = row_groups<RR, PAIR>(N);
    for (int t = blockIdx.x * WARPS + (threadIdx.x >> 5); t < groups; t += gridDim.x * WARPS) {
        const int n0 = t * RR;
        const uint4* wr[RR];
#pragma unroll
        for (int r = 0; r < RR; ++r)
            wr[r] = reinterpret_cast<const uint4*>(w + (long long)row_of<RR, PAIR>(t, r, N) * K);
        float acc[RR][M];
#pragma unroll
        for (int r = 0; r < RR; ++r)
#pragma unroll
            for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
        int c = lane;
        for (; c + (U - 1) * 32 < chunks; c += U * 32) {
            uint4 wv[U][RR];
#pragma unroll
            for (int u = 0; u < U; ++u)
#pragma unroll
                for (int r = 0; r < RR; ++r) wv[u][r] = load_stream(wr[r] + c + u * 32);
#pragma unroll
            for (int u = 0; u < U; ++u)
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    const uint4 xv = x_chunk<M, SMEM>(xr, m, c + u * 32);
#pragma unroll
                    for (int r = 0; r < RR; ++r) acc[r][m] = dot8(wv[u][r], xv, acc[r][m]);
                }
        }
        for (; c < chunks; c += 32) {  // fewer than U chunks of each row left for this lane
            uint4 wv[RR];
#pragma unroll
            for (int r = 0; r < RR; ++r) wv[r] = load_stream(wr[r] + c);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const uint4 xv = x_chunk<M, SMEM>(xr, m, c);
#pragma unroll
                for (int r = 0; r < RR; ++r) acc[r][m] = dot8(wv[r], xv, acc[r][m]);
            }
        }
        // Butterfly sums: every lane ends with the same (bitwise) totals.
#pragma unroll
        for (int r = 0; r < RR; ++r)
#pragma unroll
            for (int m = 0; m < M; ++m)
#pragma unroll
                for (int o = 16; o > 0; o >>= 1)
                    acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);
        if (PAIR) {
            const int half = N >> 1;
            float g = 0.0f, u = 0.0f;  // lane m < M writes row m (one silu call site)
#pragma unroll
            for (int m = 0; m < M; ++m)
                if (lane == m) {
                    g = acc[0][m];
                    u = acc[RR - 1][m];
                }
            if (lane < M) {
                if (bias != nullptr) {
                    g += to_f(bias[t]);
                    u += to_f(bias[t + half]);
                }
                y[lane * y_stride + t] = silu_pair(g, u);
            }
            continue;
        }
#pragma unroll
        for (int r = 0; r < RR; ++r)
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const int n = n0 + r;
                if (lane != r * M + m || n >= N) continue;
                float s = acc[r][m];
                if (bias != nullptr) s += to_f(bias[n]);
                elem_t out = from_f(s);
                if (residual != nullptr)
                    out = from_f(__fadd_rn(to_f(out), to_f(residual[m * r_stride + n])));
                y[m * y_stride + n] = out;
            }
    }
}

}  // namespace hr_gemv2

// x [M, K] (x_stride), w [N, K], bias [N] or null, residual [M, N] (r_stride) or null,
// y [M, N] (y_stride). nw / eps: the norm kernels' RMSNorm weight [K] and epsilon (unused
// elsewhere). The silu kernels' x is [M, 2K].
#define HR_GEMV2_ARGS                                                                        \
    const elem_t *__restrict__ x, long long x_stride, const elem_t *__restrict__ w,          \
        const elem_t *__restrict__ bias, const elem_t *residual, long long r_stride,         \
        elem_t *y, long long y_stride, const elem_t *__restrict__ nw, float eps, int N, int K

template <int M>
__device__ __forceinline__ void gemv2_plain(HR_GEMV2_ARGS) {
    hr_gemv2::prefetch_first_rows<1, hr_gemv2::R, false>(w, N, K);
    hr_gemv2::griddep_wait();
    hr_gemv2::griddep_launch_dependents();
    const uint4* xr[M];
#pragma unroll
    for (int m = 0; m < M; ++m) xr[m] = reinterpret_cast<const uint4*>(x + m * x_stride);
    hr_gemv2::rows_loop<M, false>(xr, w, bias, residual, r_stride, y, y_stride, N, K);
}

// PRO 1: RMSNorm, 2: SiLU-and-mul (x [M, 2K]), 3: RMSNorm and the gate/up pair epilogue
// (w [N, K] = gate | up, y [M, N/2] = silu(gate) * up; two rows per warp whatever HR_R).
template <int M, int PRO>
__device__ __forceinline__ void gemv2_fused(HR_GEMV2_ARGS) {
    constexpr bool PAIR = PRO == 3;
    constexpr int RR = PAIR ? 2 : hr_gemv2::R;
    extern __shared__ uint4 hr_gemv2_xs[];
    hr_gemv2::prefetch_first_rows<PRO == 2 ? 4 : 2, RR, PAIR>(w, N, K);  // norm ~1 us, SiLU ~2
    hr_gemv2::griddep_wait();
    hr_gemv2::griddep_launch_dependents();
    if (PRO == 2)
        hr_gemv2::silu_prologue<M>(x, x_stride, K, hr_gemv2_xs);
    else
        hr_gemv2::norm_prologue<M>(x, x_stride, nw, eps, K, hr_gemv2_xs);
    const uint4* xr[M];
#pragma unroll
    for (int m = 0; m < M; ++m) xr[m] = hr_gemv2_xs + m * (K / hr_gemv2::VEC);
    hr_gemv2::rows_loop<M, true, RR, PAIR>(xr, w, bias, residual, r_stride, y, y_stride, N, K);
}

#define HR_GEMV2_PASS x, x_stride, w, bias, residual, r_stride, y, y_stride, nw, eps, N, K
extern "C" __global__ void __launch_bounds__(256) gemv2_m1(HR_GEMV2_ARGS) {
    gemv2_plain<1>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_m2(HR_GEMV2_ARGS) {
    gemv2_plain<2>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_m3(HR_GEMV2_ARGS) {
    gemv2_plain<3>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_m4(HR_GEMV2_ARGS) {
    gemv2_plain<4>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_m5(HR_GEMV2_ARGS) {
    gemv2_plain<5>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_m6(HR_GEMV2_ARGS) {
    gemv2_plain<6>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_m7(HR_GEMV2_ARGS) {
    gemv2_plain<7>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_m8(HR_GEMV2_ARGS) {
    gemv2_plain<8>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_norm_m1(HR_GEMV2_ARGS) {
    gemv2_fused<1, 1>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_norm_m2(HR_GEMV2_ARGS) {
    gemv2_fused<2, 1>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_norm_m3(HR_GEMV2_ARGS) {
    gemv2_fused<3, 1>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_norm_m4(HR_GEMV2_ARGS) {
    gemv2_fused<4, 1>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_silu_m1(HR_GEMV2_ARGS) {
    gemv2_fused<1, 2>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_silu_m2(HR_GEMV2_ARGS) {
    gemv2_fused<2, 2>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_norm_pair_m1(HR_GEMV2_ARGS) {
    gemv2_fused<1, 3>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_norm_pair_m2(HR_GEMV2_ARGS) {
    gemv2_fused<2, 3>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_norm_pair_m3(HR_GEMV2_ARGS) {
    gemv2_fused<3, 3>(HR_GEMV2_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv2_norm_pair_m4(HR_GEMV2_ARGS) {
    gemv2_fused<4, 3>(HR_GEMV2_PASS);
}
