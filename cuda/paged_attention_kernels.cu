// Paged attention kernels for headrace (compiled at run time by NVRTC, see cuda/compiler.py).
//
// Macros set per compiled module: HR_BF16 (1: __nv_bfloat16, 0: __half), HR_HEAD_DIM (64|128),
// HR_KV_FP8 (the KV element type: 0 = elem_t, 1 = fp8 e4m3 bytes, __nv_fp8_e4m3).
// KV cache layout: [2, num_blocks, block_size, num_kv_heads, head_dim], V at kc + v_off.
// FP8 KV holds K / k_scale and V / v_scale: k_scale is folded into scale_log2 by the host,
// v_scale multiplies the output (kernel argument; 1 for 16-bit caches).
// block_size is a run-time power of two, passed as its log2 (block_shift).
//
// decode_g{1,2,4,8}: flash-decoding. Grid (max_splits, num_kv_heads * head_chunks, batch),
//   128 threads. A block owns up to GQ query heads sharing one KV head, so each K/V byte
//   leaves HBM once. The request's split count comes from its seq_len read on the device
//   (split_range), so a graph captured at short lengths is still right at long ones.
//   One split: the block writes the output itself. Several: fp32 partial output and a
//   log2-domain log-sum-exp per split, combined by merge_splits.
// prefill: FlashAttention-2 style, mma.sync m16n8k16 (fp32 accumulate). Grid
//   (ceil(max_query_len * group / 64), num_kv_heads, batch), 128 threads (4 warps x 16 rows).
//   Rows are (query token, query head of the group) pairs; causal mask is bottom-right.
// window (every kernel's last argument): sliding-window attention, a query at position p
//   sees keys in (p - window, p]; 0 = no window. Decode splits only the visible span;
//   prefill starts at the first tile any of its rows can see.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#ifndef HR_BF16
#define HR_BF16 1
#endif
#ifndef HR_HEAD_DIM
#define HR_HEAD_DIM 128
#endif
#ifndef HR_KV_FP8
#define HR_KV_FP8 0
#endif

#if HR_BF16
typedef __nv_bfloat16 elem_t;
typedef __nv_bfloat162 elem2_t;
__device__ __forceinline__ float2 to_f2(elem2_t v) { return __bfloat1622float2(v); }
__device__ __forceinline__ elem2_t from_f2(float a, float b) { return __floats2bfloat162_rn(a, b); }
__device__ __forceinline__ elem_t from_f(float a) { return __float2bfloat16(a); }
#define HR_MMA_TYPE "bf16"
#else
typedef __half elem_t;
typedef __half2 elem2_t;
__device__ __forceinline__ float2 to_f2(elem2_t v) { return __half22float2(v); }
__device__ __forceinline__ elem2_t from_f2(float a, float b) { return __floats2half2_rn(a, b); }
__device__ __forceinline__ elem_t from_f(float a) { return __float2half(a); }
#define HR_MMA_TYPE "f16"
#endif

constexpr int D = HR_HEAD_DIM;
constexpr int MIN_CHUNK = 128;  // tokens: smallest flash-decoding split worth a block

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
#include "split_merge.cuh"  // merged_split_output: the splits' merge
#include "decode_block.cuh"  // decode_block: a block's split, heads and request

// Splits used by one request: at most max_splits, none shorter than MIN_CHUNK.
// decode and merge_splits must agree, so both call this.
__device__ __forceinline__ void split_range(int seq_len, int max_splits, int& nsplit, int& chunk) {
    int n = (seq_len + MIN_CHUNK - 1) / MIN_CHUNK;
    n = max(1, min(n, max_splits));
    chunk = (seq_len + n - 1) / n;
    chunk = (chunk + 15) & ~15;
    nsplit = chunk > 0 ? (seq_len + chunk - 1) / chunk : 0;
}

__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
    const elem2_t* p = reinterpret_cast<const elem2_t*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 t = to_f2(p[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

// KV element type. A thread's 8 elements of a row: one 16-byte vector (16-bit KV) or one
// 8-byte vector (FP8 KV), unpacked to fp32 (FP8 -> half is exact, then -> float).
#if HR_KV_FP8
typedef unsigned char kv_t;  // __nv_fp8_e4m3 storage
typedef uint2 kvvec_t;
__device__ __forceinline__ float2 fp8x2_to_f2(unsigned short v) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(v, __NV_E4M3);
    return __half22float2(*reinterpret_cast<const __half2*>(&h));
}
__device__ __forceinline__ void unpack8_kv(const kvvec_t& v, float (&f)[8]) {
    const unsigned w[2] = {v.x, v.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float2 a = fp8x2_to_f2(static_cast<unsigned short>(w[i] & 0xffffu));
        const float2 b = fp8x2_to_f2(static_cast<unsigned short>(w[i] >> 16));
        f[4 * i] = a.x;
        f[4 * i + 1] = a.y;
        f[4 * i + 2] = b.x;
        f[4 * i + 3] = b.y;
    }
}
__device__ __forceinline__ kvvec_t kv_zero() { return make_uint2(0u, 0u); }
// 8 FP8 values -> 8 elem_t in one 16-byte vector (the prefill's shared-memory tiles).
__device__ __forceinline__ uint4 fp8x8_to_elem8(const uint2& v) {
    float f[8];
    unpack8_kv(v, f);
    uint4 out;
    elem2_t* p = reinterpret_cast<elem2_t*>(&out);
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = from_f2(f[2 * i], f[2 * i + 1]);
    return out;
}
#else
typedef elem_t kv_t;
typedef uint4 kvvec_t;
__device__ __forceinline__ void unpack8_kv(const kvvec_t& v, float (&f)[8]) { unpack8(v, f); }
__device__ __forceinline__ kvvec_t kv_zero() { return make_uint4(0u, 0u, 0u, 0u); }
#endif

// ------------------------------------------------------------------------------------------
// Decode
// ------------------------------------------------------------------------------------------
constexpr int DEC_THREADS = 128;
constexpr int LPR = D / 8;                 // lanes per K/V row: one 16-byte vector each
constexpr int RPP = DEC_THREADS / LPR;     // rows (tokens) per pass of the block

template <int GQ, int U>
__device__ __forceinline__ void decode_impl(
    const elem_t* __restrict__ q, long long q_stride, const kv_t* __restrict__ kc,
    long long v_off, const int* __restrict__ query_start_loc, const int* __restrict__ seq_lens,
    const int* __restrict__ block_tables, int bt_stride, elem_t* __restrict__ out,
    long long out_stride, float* __restrict__ part_o, float* __restrict__ part_lse,
    int num_kv_heads, int group, int block_shift, float scale_log2, float v_scale,
    int window) {
    __shared__ float sm_m[RPP][GQ];
    __shared__ float sm_l[RPP][GQ];
    __shared__ __align__(16) float sm_acc[RPP][GQ][D];

    const int max_splits = gridDim.x;
    const DecodeBlock blk = decode_block<GQ>(group, query_start_loc, seq_lens);
    const int split = blk.split, kvh = blk.kvh, g0 = blk.g0, gcount = blk.gcount;
    const int r = blk.r, qs = blk.qs, q_len = blk.q_len, seq_len = blk.seq_len;
    if (q_len <= 0 || seq_len <= 0) return;
    const int lo = window > 0 ? max(0, seq_len - window) : 0;  // first visible key
    int nsplit, chunk;
    split_range(seq_len - lo, max_splits, nsplit, chunk);
    if (split >= nsplit) return;
    const int t_begin = lo + split * chunk;
    const int t_end = min(seq_len, t_begin + chunk);
    const int qrow = qs + q_len - 1;
    const int num_q_heads = num_kv_heads * group;
    const int head0 = kvh * group + g0;

    const int tid = threadIdx.x;
    const int lane_d = tid % LPR;  // which 8 dims of the row
    const int row = tid / LPR;     // which token of the pass

    float qf[GQ][8];
#pragma unroll
    for (int g = 0; g < GQ; ++g) {
        if (g < gcount) {
            uint4 v = *reinterpret_cast<const uint4*>(q + (long long)qrow * q_stride +
                                                      (long long)(head0 + g) * D + lane_d * 8);
            unpack8(v, qf[g]);
#pragma unroll
            for (int j = 0; j < 8; ++j) qf[g][j] *= scale_log2;
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) qf[g][j] = 0.f;
        }
    }

    float m[GQ], l[GQ], acc[GQ][8];
#pragma unroll
    for (int g = 0; g < GQ; ++g) {
        m[g] = neg_inf();
        l[g] = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
    }

    const int* bt = block_tables + (long long)r * bt_stride;
    const int bmask = (1 << block_shift) - 1;
    constexpr int STEP = RPP * U;

    // Page ids run one tile ahead of the K/V loads, which run one tile ahead of the math,
    // so the block-table read never sits in front of a K/V load on the critical path.
    auto pages = [&](int t0, int (&pg)[U]) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = t0 + u * RPP + row;
            pg[u] = t < t_end ? bt[t >> block_shift] : 0;
        }
    };
    auto load = [&](int t0, const int (&pg)[U], kvvec_t (&kk)[U], kvvec_t (&vv)[U]) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = t0 + u * RPP + row;
            if (t < t_end) {
                const long long idx =
                    ((((long long)pg[u] << block_shift) + (t & bmask)) * num_kv_heads + kvh) * D +
                    lane_d * 8;
                kk[u] = __ldg(reinterpret_cast<const kvvec_t*>(kc + idx));
                vv[u] = __ldg(reinterpret_cast<const kvvec_t*>(kc + v_off + idx));
            } else {
                kk[u] = kv_zero();
                vv[u] = kv_zero();
            }
        }
    };
    kvvec_t kcur[U], vcur[U];
    int pg[U];
    pages(t_begin, pg);
    load(t_begin, pg, kcur, vcur);
    pages(t_begin + STEP, pg);

    for (int t0 = t_begin; t0 < t_end; t0 += STEP) {
        kvvec_t knext[U], vnext[U];
        if (t0 + STEP < t_end) {
            load(t0 + STEP, pg, knext, vnext);
            pages(t0 + 2 * STEP, pg);
        }

        float s[U][GQ];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float kf[8];
            unpack8_kv(kcur[u], kf);
#pragma unroll
            for (int g = 0; g < GQ; ++g) {
                float acc_s = 0.f;
#pragma unroll
                for (int j = 0; j < 8; ++j) acc_s = fmaf(qf[g][j], kf[j], acc_s);
                s[u][g] = acc_s;
            }
        }
#pragma unroll
        for (int off = LPR / 2; off > 0; off >>= 1) {
#pragma unroll
            for (int u = 0; u < U; ++u)
#pragma unroll
                for (int g = 0; g < GQ; ++g)
                    s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (t0 + u * RPP + row >= t_end) {
#pragma unroll
                for (int g = 0; g < GQ; ++g) s[u][g] = neg_inf();
            }
        }
        float vf[U][8];
#pragma unroll
        for (int u = 0; u < U; ++u) unpack8_kv(vcur[u], vf[u]);
#pragma unroll
        for (int g = 0; g < GQ; ++g) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][g]);
            const float base = mx == neg_inf() ? 0.f : mx;
            const float corr = exp2f(m[g] - base);
            m[g] = mx;
            l[g] *= corr;
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[g][j] *= corr;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const float p = exp2f(s[u][g] - base);
                l[g] += p;
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(p, vf[u][j], acc[g][j]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            kcur[u] = knext[u];
            vcur[u] = vnext[u];
        }
    }

    // Combine the RPP row groups of the block.
#pragma unroll
    for (int g = 0; g < GQ; ++g) {
        if (lane_d == 0) {
            sm_m[row][g] = m[g];
            sm_l[row][g] = l[g];
        }
        float4* dst = reinterpret_cast<float4*>(&sm_acc[row][g][lane_d * 8]);
        dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
        dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    }
    __syncthreads();
    for (int i = tid; i < GQ * D; i += DEC_THREADS) {
        const int g = i / D;
        const int d = i % D;
        if (g >= gcount) break;
        float mx = neg_inf();
#pragma unroll
        for (int rr = 0; rr < RPP; ++rr) mx = fmaxf(mx, sm_m[rr][g]);
        const float base = mx == neg_inf() ? 0.f : mx;
        float L = 0.f, O = 0.f;
#pragma unroll
        for (int rr = 0; rr < RPP; ++rr) {
            const float w = exp2f(sm_m[rr][g] - base);
            L = fmaf(sm_l[rr][g], w, L);
            O = fmaf(sm_acc[rr][g][d], w, O);
        }
        const float o = L > 0.f ? O / L * v_scale : 0.f;
        const int h = head0 + g;
        if (nsplit == 1) {
            out[(long long)qrow * out_stride + (long long)h * D + d] = from_f(o);
        } else {
            const long long ph = ((long long)r * num_q_heads + h) * max_splits + split;
            part_o[ph * D + d] = o;
            if (d == 0) part_lse[ph] = L > 0.f ? base + log2f(L) : neg_inf();
        }
    }
}

#define HR_DECODE_ARGS                                                                      \
    const elem_t *__restrict__ q, long long q_stride, const kv_t *__restrict__ kc,          \
        long long v_off, const int *__restrict__ query_start_loc,                           \
        const int *__restrict__ seq_lens, const int *__restrict__ block_tables, int bt_stride, \
        elem_t *__restrict__ out, long long out_stride, float *__restrict__ part_o,         \
        float *__restrict__ part_lse, int num_kv_heads, int group, int block_shift,         \
        float scale_log2, float v_scale, int window
#define HR_DECODE_PASS                                                                   \
    q, q_stride, kc, v_off, query_start_loc, seq_lens, block_tables, bt_stride, out,     \
        out_stride, part_o, part_lse, num_kv_heads, group, block_shift, scale_log2, v_scale, \
        window

extern "C" __global__ void __launch_bounds__(DEC_THREADS) decode_g1(HR_DECODE_ARGS) {
    decode_impl<1, 4>(HR_DECODE_PASS);
}
extern "C" __global__ void __launch_bounds__(DEC_THREADS) decode_g2(HR_DECODE_ARGS) {
    decode_impl<2, 4>(HR_DECODE_PASS);
}
extern "C" __global__ void __launch_bounds__(DEC_THREADS) decode_g4(HR_DECODE_ARGS) {
    decode_impl<4, 4>(HR_DECODE_PASS);
}
extern "C" __global__ void __launch_bounds__(DEC_THREADS) decode_g8(HR_DECODE_ARGS) {
    decode_impl<8, 2>(HR_DECODE_PASS);
}

// Grid (num_q_heads, batch), D threads. Log-sum-exp merge of a request's splits; requests
// that used one split were written by the decode kernel and are skipped here.
extern "C" __global__ void __launch_bounds__(D) merge_splits(
    const float* __restrict__ part_o, const float* __restrict__ part_lse,
    const int* __restrict__ query_start_loc, const int* __restrict__ seq_lens,
    elem_t* __restrict__ out, long long out_stride, int max_splits, int window) {
    const int h = blockIdx.x;
    const int r = blockIdx.y;
    const int qs = query_start_loc[r];
    const int q_len = query_start_loc[r + 1] - qs;
    const int seq_len = seq_lens[r];
    if (q_len <= 0 || seq_len <= 0) return;
    const int lo = window > 0 ? max(0, seq_len - window) : 0;
    int nsplit, chunk;
    split_range(seq_len - lo, max_splits, nsplit, chunk);
    if (nsplit <= 1) return;
    const long long ph = ((long long)r * gridDim.x + h) * max_splits;
    const int d = threadIdx.x;
    const int qrow = qs + q_len - 1;
    out[(long long)qrow * out_stride + (long long)h * D + d] =
        from_f(merged_split_output(part_lse, part_o, ph, nsplit, d));
}

// ------------------------------------------------------------------------------------------
// Prefill (tensor cores)
// ------------------------------------------------------------------------------------------
constexpr int BM = 64;  // rows (query token x group head) per block, 16 per warp
constexpr int BN = 64;  // keys per tile
constexpr int PF_THREADS = 128;
constexpr int CPR = D / 8;  // 16-byte chunks per row

// Row-major [rows][D] tile with 16-byte chunks XOR-swizzled by row, so the 8 rows an
// ldmatrix phase reads hit 8 different bank groups.
__device__ __forceinline__ int swz(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
    const int n = pred ? 16 : 0;  // 0: zero-fill, nothing read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
                 "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                         unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." HR_MMA_TYPE "." HR_MMA_TYPE
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned pack2(float a, float b) {
    elem2_t v = from_f2(a, b);
    return *reinterpret_cast<unsigned*>(&v);
}

extern "C" __global__ void __launch_bounds__(PF_THREADS) prefill(
    const elem_t* __restrict__ q, long long q_stride, const kv_t* __restrict__ kc,
    long long v_off, const int* __restrict__ query_start_loc, const int* __restrict__ seq_lens,
    const int* __restrict__ block_tables, int bt_stride, elem_t* __restrict__ out,
    long long out_stride, int num_kv_heads, int group, int block_shift, float scale_log2,
    float v_scale, int window) {
    __shared__ __align__(128) elem_t sQ[BM * D];
    __shared__ __align__(128) elem_t sK[BN * D];
    __shared__ __align__(128) elem_t sV[BN * D];

    const int r = blockIdx.z;
    const int kvh = blockIdx.y;
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // heaviest (last) row tiles first
    const int qs = query_start_loc[r];
    const int q_len = query_start_loc[r + 1] - qs;
    const int seq_len = seq_lens[r];
    const int rows = q_len * group;
    if (m0 >= rows || seq_len <= 0) return;
    const int ctx = seq_len - q_len;  // cached tokens before this step's queries
    const int i_lo = m0 / group;
    const int i_hi = min(q_len - 1, (m0 + BM - 1) / group);
    const int kv_hi = min(seq_len, i_hi + ctx + 1);
    const int ntiles = (kv_hi + BN - 1) / BN;
    const int unmasked_below = min(seq_len, i_lo + ctx + 1);  // keys every row of tile sees
    // Sliding window: keys below the first row's window are seen by no row of the tile;
    // keys below the last row's window are hidden from some.
    const int n_begin = window > 0 ? max(0, i_lo + ctx - window + 1) / BN : 0;
    const int masked_below = window > 0 ? i_hi + ctx - window + 1 : 0;

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int* bt = block_tables + (long long)r * bt_stride;
    const int bmask = (1 << block_shift) - 1;

    // Q tile -> shared (rows past the request are zero-filled).
#pragma unroll
    for (int i = tid; i < BM * CPR; i += PF_THREADS) {
        const int row = i / CPR, c = i % CPR;
        const int mrow = m0 + row;
        const bool ok = mrow < rows;
        const elem_t* src = q;
        if (ok) {
            const int tok = qs + mrow / group;
            const int h = kvh * group + mrow % group;
            src = q + (long long)tok * q_stride + (long long)h * D + c * 8;
        }
        cp_async16(&sQ[swz(row, c)], src, ok);
    }
    auto load_kv = [&](elem_t* dst, long long base_off, int n0) {
#if HR_KV_FP8
#pragma unroll 4
#else
#pragma unroll
#endif
        for (int i = tid; i < BN * CPR; i += PF_THREADS) {
            const int row = i / CPR, c = i % CPR;
            const int j = n0 + row;
            const bool ok = j < seq_len;
            const kv_t* src = kc;
            if (ok) {
                const long long page = bt[j >> block_shift];
                src = kc + base_off +
                      (((page << block_shift) + (j & bmask)) * num_kv_heads + kvh) * D + c * 8;
            }
#if HR_KV_FP8
            // FP8 rows are widened to elem_t on the way into shared memory (a plain load
            // and store, not cp.async), so the tile layout and the mma path stay the same.
            // The barriers around each tile's use order these stores like the cp.async ones.
            const uint4 val = ok ? fp8x8_to_elem8(__ldg(reinterpret_cast<const uint2*>(src)))
                                 : make_uint4(0u, 0u, 0u, 0u);
            *reinterpret_cast<uint4*>(&dst[swz(row, c)]) = val;
#else
            cp_async16(&dst[swz(row, c)], src, ok);
#endif
        }
    };
    load_kv(sK, 0, n_begin * BN);
    cp_async_commit();  // group: Q + K(n_begin)

    unsigned qf[D / 16][4];
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float mrow[2] = {neg_inf(), neg_inf()};
    float lrow[2] = {0.f, 0.f};

    // Rows this thread holds in the accumulators: r_lo and r_lo + 8 of the warp's 16.
    const int r_lo = m0 + warp * 16 + lane / 4;
    int limit[2];  // last visible key of each row (bottom-right causal)
    int lower[2];  // keys <= lower are outside the row's sliding window
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int rr = r_lo + hh * 8;
        limit[hh] = rr < rows ? rr / group + ctx : -1;
        lower[hh] = window > 0 ? limit[hh] - window : -1;
    }

    for (int n = n_begin; n < ntiles; ++n) {
        const int n0 = n * BN;
        load_kv(sV, v_off, n0);
        cp_async_commit();
        cp_async_wait<1>();  // Q and K(n) landed
        __syncthreads();
        if (n == n_begin) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const int row = warp * 16 + (lane & 15);
                ldsm_x4(qf[kk], &sQ[swz(row, kk * 2 + (lane >> 4))]);
            }
        }
        float s[BN / 8][4];
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int p = 0; p < BN / 16; ++p) {
                unsigned b[4];
                const int key = p * 16 + (lane & 7) + ((lane >> 4) << 3);
                ldsm_x4(b, &sK[swz(key, kk * 2 + ((lane >> 3) & 1))]);
                mma16816(s[2 * p], qf[kk], b[0], b[1]);
                mma16816(s[2 * p + 1], qf[kk], b[2], b[3]);
            }
        }
        __syncthreads();  // every warp is done with sK
        if (n + 1 < ntiles) load_kv(sK, 0, n0 + BN);
        cp_async_commit();

        const bool need_mask = n0 + BN > unmasked_below || n0 < masked_below;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float mx = mrow[hh];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float v = s[nt][hh * 2 + e] * scale_log2;
                    if (need_mask) {
                        const int j = n0 + nt * 8 + (lane & 3) * 2 + e;
                        if (j > limit[hh] || j <= lower[hh]) v = neg_inf();
                    }
                    s[nt][hh * 2 + e] = v;
                    mx = fmaxf(mx, v);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float base = mx == neg_inf() ? 0.f : mx;
            const float corr = exp2f(mrow[hh] - base);
            mrow[hh] = mx;
            float lsum = 0.f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = exp2f(s[nt][hh * 2 + e] - base);
                    s[nt][hh * 2 + e] = p;
                    lsum += p;
                }
            }
            lrow[hh] = lrow[hh] * corr + lsum;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o[dt][hh * 2] *= corr;
                o[dt][hh * 2 + 1] *= corr;
            }
        }

        cp_async_wait<1>();  // V(n) landed (K(n+1) may still fly)
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned a[4];
            a[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                unsigned b[4];
                const int key = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                ldsm_x4_t(b, &sV[swz(key, dp * 2 + (lane >> 4))]);
                mma16816(o[2 * dp], a, b[0], b[1]);
                mma16816(o[2 * dp + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // every warp is done with sV
    }
    cp_async_wait<0>();

#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float l = lrow[hh];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int rr = r_lo + hh * 8;
        if (rr >= rows) continue;
        const float inv = l > 0.f ? v_scale / l : 0.f;
        const int tok = qs + rr / group;
        const int h = kvh * group + rr % group;
        elem_t* dst = out + (long long)tok * out_stride + (long long)h * D + (lane & 3) * 2;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            *reinterpret_cast<elem2_t*>(dst + dt * 8) =
                from_f2(o[dt][hh * 2] * inv, o[dt][hh * 2 + 1] * inv);
        }
    }
}
