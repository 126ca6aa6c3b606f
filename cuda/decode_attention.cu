// Decode attention (one query token per request) on tensor cores, for paged KV caches.
// Compiled at run time by NVRTC (cuda/compiler.py); cuda/decode_attention.py launches it.
//
// Macros per compiled module: HR_BF16 (1: __nv_bfloat16, 0: __half), HR_HEAD_DIM (64|128).
// The KV element type is a template parameter: decode_tc reads a 16-bit cache (elem_t),
// decode_tc_fp8 an FP8 e4m3 cache holding K / k_scale and V / v_scale (k_scale is folded
// into scale_log2 by the host, v_scale multiplies the output).
// KV cache layout: [2, num_blocks, block_size, num_kv_heads, head_dim], V at kc + v_off;
// block_size is a power of two >= 16 (passed as its log2), so a 16-token tile aligned to 16
// sits in one page and needs one block-table read.
//
// Grid (max_splits, num_kv_heads * ceil(group / 8), batch), WARPS warps (HR_DECODE_WARPS),
// WARPS * STAGES tiles of dynamic shared memory (HR_DECODE_STAGES). A block owns up to 8
// query heads sharing one KV head (each K/V byte leaves HBM once) over one split of the
// request's visible keys; a request's split count comes from its seq_len on the device
// (split_range), so a graph captured at short lengths is right at long ones.
//
// Each warp streams its own 16-token tiles (tile w, w + WARPS, ...) through a STAGES-deep
// cp.async pipeline in shared memory (all STAGES in flight before the first wait, each stage
// refilled as soon as the warp has read it). The copies are coalesced: consecutive lanes take
// consecutive 16-byte units of one token's row (a head's D elements), so every request
// covers whole 128-byte lines (with fragment-shaped copies, half of K's requests were
// 64-byte halves of a line: L2 at 91% busy for 65% of DRAM bandwidth). A stage holds the
// tile's K then V rows, [16 tokens][D], each row's units XOR-swizzled by swz(token) so that
// the fragment-shaped reads below hit distinct banks. A warp's stages are its own, so
// cp.async.wait_group plus __syncwarp is the whole synchronisation.
//
// Math per tile, mma.sync m16n8k16 with fp32 accumulators (rows past the group are zero):
//   S [16 heads x 8 tokens] = Q [16 heads x D] . K^T           (two n8 tiles of tokens)
//   O^T [D x 8 heads]      += V^T [D x 16 tokens] . P^T [16 tokens x 8 heads]
// Q K^T is a sum over head dims, so Q and K may take the dims in any common order: thread
// (row n = lane / 4, quad q = lane % 4) holds dims 8 * (4p + q) .. + 7 of its token (16 bytes)
// and uses them as k-steps 2p and 2p + 1. The C fragment of S is then exactly the B
// fragment of P^T. In O^T, m-tile i = 4c + j row m is head dim 64c + 8 (m % 8) + 4 (m / 8) + j,
// so the thread's V rows (dims 64c + 8n .. + 7 of four tokens) are again 16-byte vectors,
// repacked into token pairs with byte permutes.
//
// One split: the block writes the output. Several: an fp32 partial output (times v_scale)
// and a log2-domain log-sum-exp per split, combined by the last split to finish (counters:
// merge_if_last), or by decode_tc_merge when counters is null.
// window: sliding-window attention, the query (at seq_len - 1) sees keys >= seq_len - window;
// 0 = no window. Splits cover only the visible span (from its 16-aligned start).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#ifndef HR_BF16
#define HR_BF16 1
#endif
#ifndef HR_HEAD_DIM
#define HR_HEAD_DIM 128
#endif
#ifndef HR_DECODE_WARPS
#define HR_DECODE_WARPS 4
#endif
#ifndef HR_DECODE_MERGE3
#define HR_DECODE_MERGE3 0  // 1: plan v3's fused merge (decode_merge.cuh)
#endif
#ifndef HR_DECODE_STAGES
#define HR_DECODE_STAGES 2
#endif

#if HR_BF16
typedef __nv_bfloat16 elem_t;
typedef __nv_bfloat162 elem2_t;
__device__ __forceinline__ elem2_t f2_to_e2(float a, float b) { return __floats2bfloat162_rn(a, b); }
__device__ __forceinline__ elem_t f_to_e(float a) { return __float2bfloat16(a); }
#define HR_MMA_TYPE "bf16"
#else
typedef __half elem_t;
typedef __half2 elem2_t;
__device__ __forceinline__ elem2_t f2_to_e2(float a, float b) { return __floats2half2_rn(a, b); }
__device__ __forceinline__ elem_t f_to_e(float a) { return __float2half(a); }
#define HR_MMA_TYPE "f16"
#endif

constexpr int D = HR_HEAD_DIM;
constexpr int WARPS = HR_DECODE_WARPS;
constexpr int STAGES = HR_DECODE_STAGES;
constexpr int THREADS = WARPS * 32;
constexpr int MIN_BLOCKS = WARPS >= 12 ? 1 : 12 / WARPS;  // 12 warps per SM: <= 170 registers
constexpr int TILE = 16;                   // tokens per warp per pipeline stage
constexpr int GQ = 8;                      // query heads per block (the n of P V)
constexpr int KVEC = D / 32;               // K vectors per thread per 8-token half tile
constexpr int VVEC = D / 64;               // V vectors per thread per token
constexpr int MT = D / 16;                 // k-steps of Q K^T, m-tiles of O^T
static_assert(STAGES >= 2, "a pipeline needs two stages");
static_assert(WARPS >= 1 && WARPS <= 16, "1..16 warps");

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
#include "split_merge.cuh"  // merged_split_output: the splits' merge
#include "decode_block.cuh"  // decode_block: a block's split, heads and request

// Splits used by one request: visible keys [first, seq_len) with first = the window start
// rounded down to a tile, cut into at most max_splits splits of >= min_chunk tokens, each a
// whole number of tiles. The decode and merge kernels must agree, so both call this.
__device__ __forceinline__ void split_range(int seq_len, int window, int max_splits,
                                            int min_chunk, int& lo, int& first, int& nsplit,
                                            int& chunk) {
    lo = window > 0 ? max(0, seq_len - window) : 0;
    first = lo & ~(TILE - 1);
    const int span = seq_len - first;
    int n = (span + min_chunk - 1) / min_chunk;
    n = max(1, min(n, max_splits));
    chunk = (span + n - 1) / n;
    chunk = (chunk + TILE - 1) & ~(TILE - 1);
    nsplit = (span + chunk - 1) / chunk;
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ unsigned pack_e2(float a, float b) {
    elem2_t v = f2_to_e2(a, b);
    return *reinterpret_cast<unsigned*>(&v);
}

#include "decode_kv.cuh"  // KvVec, pack_p, q_word, widen_kv: the KV types and operands
#include "decode_stage.cuh"  // copy16, swz, smem_off, Stage, copy_xor: the stage layout

// c += a . b, m16n8k16, fp32 accumulators; a0..a3 and b0, b1 in PTX's fragment order.
// H: the operands are half whatever elem_t is (decode_tc_fp8h).
template <bool H = false>
__device__ __forceinline__ void mma16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
    if constexpr (H) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16"
                     ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." HR_MMA_TYPE "." HR_MMA_TYPE
                     ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ unsigned word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
// Element e (0..7) of vector x in the low half, the same element of y in the high half.
__device__ __forceinline__ unsigned pair(const uint4& x, const uint4& y, int e) {
    return __byte_perm(word(x, e >> 1), word(y, e >> 1), (e & 1) ? 0x7632 : 0x5410);
}

#define HR_DECODE_TC_ARGS                                                                     \
    const elem_t *__restrict__ q, long long q_stride, const unsigned char *__restrict__ kc,  \
        long long v_off, const int *__restrict__ query_start_loc,                            \
        const int *__restrict__ seq_lens, const int *__restrict__ block_tables, int bt_stride, \
        elem_t *__restrict__ out, long long out_stride, float *__restrict__ part_o,          \
        float *__restrict__ part_lse, int num_kv_heads, int group, int block_shift,          \
        float scale_log2, float v_scale, int window, int min_chunk, int *__restrict__ counters
#define HR_DECODE_TC_PASS                                                                    \
    q, q_stride, kc, v_off, query_start_loc, seq_lens, block_tables, bt_stride, out,         \
        out_stride, part_o, part_lse, num_kv_heads, group, block_shift, scale_log2, v_scale, \
        window, min_chunk, counters

#include "decode_merge.cuh"  // merge_if_last: the fused merge of a request's splits

// One block's combine of its warps' softmax states, then the output or the split's partial.
__device__ __forceinline__ void finish(float* scratch, int warp, int lane, float m_run,
                                       float l_run, const float (&o)[MT][4], int gcount,
                                       int nsplit, int split, int r, int head0,
                                       int num_q_heads, int qrow, elem_t* __restrict__ out,
                                       long long out_stride, float* __restrict__ part_o,
                                       float* __restrict__ part_lse, float v_scale,
                                       int* __restrict__ counters) {
    float* sm_m = scratch;                    // [WARPS][GQ]
    float* sm_l = sm_m + WARPS * GQ;          // [WARPS][GQ]
    float* sm_o = sm_l + WARPS * GQ;          // [WARPS][GQ][D]
    const int n = lane >> 2, qd = lane & 3;
    float l = l_run;
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (qd == 0) {
        sm_m[warp * GQ + n] = m_run;
        sm_l[warp * GQ + n] = l;
    }
    float* ow = sm_o + warp * GQ * D;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int d = 64 * (i / 4) + 8 * n + (i % 4);
        ow[(2 * qd) * D + d] = o[i][0];
        ow[(2 * qd + 1) * D + d] = o[i][1];
        ow[(2 * qd) * D + d + 4] = o[i][2];
        ow[(2 * qd + 1) * D + d + 4] = o[i][3];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < gcount * D; idx += THREADS) {
        const int g = idx / D, d = idx % D;
        float mx = neg_inf();
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_m[w * GQ + g]);
        const float base = mx == neg_inf() ? 0.f : mx;
        float L = 0.f, O = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float wt = exp2f(sm_m[w * GQ + g] - base);  // an idle warp: -inf -> 0
            L = fmaf(sm_l[w * GQ + g], wt, L);
            O = fmaf(sm_o[(w * GQ + g) * D + d], wt, O);
        }
        const float val = L > 0.f ? O / L * v_scale : 0.f;
        const int h = head0 + g;
        if (nsplit == 1) {
            out[(long long)qrow * out_stride + (long long)h * D + d] = f_to_e(val);
        } else {
            const long long ph = ((long long)r * num_q_heads + h) * gridDim.x + split;
            part_o[ph * D + d] = val;
            if (d == 0) part_lse[ph] = L > 0.f ? base + log2f(L) : neg_inf();
        }
    }
    if (nsplit > 1 && counters != nullptr)
        merge_if_last(counters, nsplit, r, head0, gcount, num_q_heads, qrow, out, out_stride,
                      part_o, part_lse, scratch);
}

template <typename KV, bool H = false>
__device__ __forceinline__ void decode_tc_impl(HR_DECODE_TC_ARGS) {
    typedef KvVec<KV> Vec;
    typedef typename Vec::raw_t raw_t;
    typedef Stage<sizeof(KV)> St;
    constexpr int STAGE = St::BYTES;  // one warp's tile in shared memory
    static_assert(WARPS * GQ * (D + 2) * 4 <= WARPS * STAGES * STAGE, "combine scratch");
    extern __shared__ __align__(16) unsigned char smem[];  // WARPS * STAGES * STAGE bytes

    const DecodeBlock blk = decode_block<GQ>(group, query_start_loc, seq_lens);
    const int split = blk.split, kvh = blk.kvh, g0 = blk.g0, gcount = blk.gcount;
    const int r = blk.r, qs = blk.qs, q_len = blk.q_len, seq_len = blk.seq_len;
    if (q_len <= 0 || seq_len <= 0) return;
    int lo, first, nsplit, chunk;
    split_range(seq_len, window, gridDim.x, min_chunk, lo, first, nsplit, chunk);
    if (split >= nsplit) return;
    const int t_begin = first + split * chunk;
    const int t_end = min(seq_len, t_begin + chunk);
    const int qrow = qs + q_len - 1;
    const int num_q_heads = num_kv_heads * group;
    const int head0 = kvh * group + g0;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = lane >> 2, qd = lane & 3;

    // Q as the A fragment of each k-step: rows n < gcount are heads head0 + n, the rest 0.
    unsigned qa[MT][2];
#pragma unroll
    for (int p = 0; p < KVEC; ++p) {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (n < gcount)
            v = *reinterpret_cast<const uint4*>(q + (long long)qrow * q_stride +
                                                (long long)(head0 + n) * D + 8 * (4 * p + qd));
        qa[2 * p][0] = q_word<H>(v.x);
        qa[2 * p][1] = q_word<H>(v.y);
        qa[2 * p + 1][0] = q_word<H>(v.z);
        qa[2 * p + 1][1] = q_word<H>(v.w);
    }

    const int ntiles = (t_end - t_begin + TILE - 1) / TILE;
    const int my_tiles = ntiles > warp ? (ntiles - warp + WARPS - 1) / WARPS : 0;
    const int* bt = block_tables + (long long)r * bt_stride;
    const int bmask = (1 << block_shift) - 1;
    const long long row_bytes = (long long)num_kv_heads * St::RB;  // between tokens
    const unsigned char* kbase = kc + (long long)kvh * St::RB;
    const long long v_bytes = v_off * (long long)sizeof(KV);
    unsigned char* wsmem = smem + warp * STAGES * STAGE;

    // Page ids, 32 tiles per lane-parallel read: pg_a holds tiles [32w, 32w + 32) of the
    // warp's sequence, pg_b the next 32 (read a window ahead, so it is there when needed).
    auto read_pages = [&](int w) {
        const int k = w * 32 + lane;
        return k < my_tiles ? bt[(t_begin + (k * WARPS + warp) * TILE) >> block_shift] : 0;
    };
    int pg_a = read_pages(0), pg_b = read_pages(1);

    // This lane's unit of each copy instruction: unit `cu` of tokens ct + TPI * i. swz is
    // linear over the bits of t and ct, TPI * i have disjoint bits, so the swizzled offset
    // of token ct + TPI * i is the lane's own (lane_soff) XOR a constant of i (copy_xor):
    // one LOP3 a copy, the row offset going into the instruction's immediate.
    const int cu = lane % St::U, ct = lane / St::U;
    const int lane_goff = ct * (int)row_bytes + cu * 16;  // < 2^31: a row is < 64 KB
    const int gstep = St::TPI * (int)row_bytes;           // between copy instructions
    const int lane_soff = ct * St::RB + ((cu ^ (swz(ct) & (St::U - 1))) << 4);
    // The lane's reads (k_read_off, v_read_off): K's token n, vector qd; V's token 2qd,
    // vector n; every other read is one of these XOR a constant, plus an immediate.
    const int kl = smem_off<sizeof(KV)>(n, qd), vl = smem_off<sizeof(KV)>(2 * qd, n);
    // Tile k of this warp into stage `stage`, zero-filled for tokens outside [lo, t_end).
    // Called once per k, in increasing k.
    auto issue = [&](int k, int stage) {
        if (k > 0 && (k & 31) == 0) {
            pg_a = pg_b;
            pg_b = read_pages((k >> 5) + 1);
        }
        const int page = __shfl_sync(0xffffffffu, pg_a, k & 31);
        const int tb = t_begin + (k * WARPS + warp) * TILE;
        const long long row0 = ((long long)page << block_shift) + (tb & bmask);
        const unsigned char* ksrc = kbase + row0 * row_bytes + lane_goff;
        const unsigned char* vsrc = ksrc + v_bytes;
        unsigned char* dst = wsmem + stage * STAGE;
        if (tb >= lo && tb + TILE <= t_end) {  // every token visible: no predicates
#pragma unroll
            for (int i = 0; i < St::CPY; ++i) {
                const int off = St::TPI * i * St::RB + (lane_soff ^ copy_xor<St>(i));
                copy16(dst + off, ksrc + i * gstep);
                copy16(dst + St::HALF + off, vsrc + i * gstep);
            }
        } else {
#pragma unroll
            for (int i = 0; i < St::CPY; ++i) {
                const int t = tb + ct + St::TPI * i;
                const bool ok = t >= lo && t < t_end;
                const int off = St::TPI * i * St::RB + (lane_soff ^ copy_xor<St>(i));
                copy16(dst + off, ok ? ksrc + i * gstep : kc, ok);
                copy16(dst + St::HALF + off, ok ? vsrc + i * gstep : kc, ok);
            }
        }
    };

#pragma unroll
    for (int s = 0; s < STAGES; ++s) {  // every stage in flight before the first wait
        if (s < my_tiles) issue(s, s);
        cp_async_commit();
    }

    float o[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_run = neg_inf();  // running max of head n (log2 units), same in its 4 lanes
    float l_run = 0.f;        // this thread's share of head n's running sum

    for (int k = 0; k < my_tiles; ++k) {
        cp_async_wait<STAGES - 1>();  // tile k landed (this thread's copies)
        __syncwarp();                 // ... and every lane's

        const unsigned char* kst = wsmem + (k % STAGES) * STAGE;
        const unsigned char* vst = kst + St::HALF;
        float s[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            s[h][0] = s[h][1] = s[h][2] = s[h][3] = 0.f;
#pragma unroll
            for (int p = 0; p < KVEC; ++p) {
                const raw_t raw =
                    *reinterpret_cast<const raw_t*>(kst + k_read_off<St>(kl, h, p));
                const uint4 kv = widen_kv<KV, H>(raw);
                mma16816<H>(s[h], qa[2 * p][0], 0u, qa[2 * p][1], 0u, kv.x, kv.y);
                mma16816<H>(s[h], qa[2 * p + 1][0], 0u, qa[2 * p + 1][1], 0u, kv.z, kv.w);
            }
        }
        // This thread's scores: head n, tokens tb + 2qd, +1 (s[0]) and tb + 8 + 2qd, +1 (s[1]).
        const int tb = t_begin + (k * WARPS + warp) * TILE;
        float sc[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int t = tb + 2 * qd + (e & 1) + 8 * (e >> 1);
            const float v = s[e >> 1][e & 1] * scale_log2;
            sc[e] = (t >= lo && t < t_end) ? v : neg_inf();
        }
        float mx = fmaxf(fmaxf(sc[0], sc[1]), fmaxf(sc[2], sc[3]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run, mx);
        if (__any_sync(0xffffffffu, m_new > m_run)) {  // some head's max rose: rescale
            const float corr = m_new == m_run ? 1.f : exp2f(m_run - m_new);
            l_run *= corr;
            // O^T columns are heads 2qd and 2qd + 1, whose factors live in lanes 8qd, 8qd + 4.
            const float ca = __shfl_sync(0xffffffffu, corr, 8 * qd);
            const float cb = __shfl_sync(0xffffffffu, corr, 8 * qd + 4);
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                o[i][0] *= ca;
                o[i][1] *= cb;
                o[i][2] *= ca;
                o[i][3] *= cb;
            }
            m_run = m_new;
        }
        const float base = m_run == neg_inf() ? 0.f : m_run;
        float pr[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            pr[e] = exp2f(sc[e] - base);
            l_run += pr[e];
        }
        const unsigned pb0 = pack_p<H>(pr[0], pr[1]);  // P^T rows (tokens) 2qd, 2qd + 1
        const unsigned pb1 = pack_p<H>(pr[2], pr[3]);  // rows 2qd + 8, 2qd + 9
        // V rows: tokens 2qd + (u & 1) + 8 (u >> 1), dims 64c + 8n .. + 7.
        auto vrow = [&](int u, int c) {
            return widen_kv<KV, H>(*reinterpret_cast<const raw_t*>(vst + v_read_off<St>(vl, u, c)));
        };
#pragma unroll
        for (int c = 0; c < VVEC; ++c) {
            const uint4 v0 = vrow(0, c), v1 = vrow(1, c), v2 = vrow(2, c), v3 = vrow(3, c);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                mma16816<H>(o[4 * c + j], pair(v0, v1, j), pair(v0, v1, 4 + j), pair(v2, v3, j),
                            pair(v2, v3, 4 + j), pb0, pb1);
            }
        }
        // Refill the stage just read, once every lane has its values in registers: while
        // tile k + 1 is computed, tiles k + 2 .. k + STAGES are in flight.
        __syncwarp();
        if (k + STAGES < my_tiles) issue(k + STAGES, k % STAGES);
        cp_async_commit();
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the stages: they become the combine scratch
    finish(reinterpret_cast<float*>(smem), warp, lane, m_run, l_run, o, gcount, nsplit, split,
           r, head0, num_q_heads, qrow, out, out_stride, part_o, part_lse, v_scale, counters);
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) decode_tc(HR_DECODE_TC_ARGS) {
    decode_tc_impl<elem_t>(HR_DECODE_TC_PASS);
}
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) decode_tc_fp8(HR_DECODE_TC_ARGS) {
    decode_tc_impl<__nv_fp8_e4m3>(HR_DECODE_TC_PASS);
}
// FP8 KV with fp16 math (HEADRACE_DECODE_FP8_MATH=f16): Q rounded to half once per block, K
// and V widened by one cvt.rn.f16x2.e4m3x2 a pair (exact), P packed as half (finer than
// bf16 on [0, 1]). On a bf16 module this takes 3 of the 4 conversions per KV pair off the
// conversion pipe, the FP8 path's bound (decode_attention.py's docstring counts them).
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) decode_tc_fp8h(HR_DECODE_TC_ARGS) {
    decode_tc_impl<__nv_fp8_e4m3, true>(HR_DECODE_TC_PASS);
}

// Grid (num_q_heads, batch), D threads. Log-sum-exp merge of a request's splits; requests
// that used one split were written by the decode kernel and are skipped here.
extern "C" __global__ void __launch_bounds__(D) decode_tc_merge(
    const float* __restrict__ part_o, const float* __restrict__ part_lse,
    const int* __restrict__ query_start_loc, const int* __restrict__ seq_lens,
    elem_t* __restrict__ out, long long out_stride, int max_splits, int window, int min_chunk) {
    const int h = blockIdx.x;
    const int r = blockIdx.y;
    const int qs = query_start_loc[r];
    const int q_len = query_start_loc[r + 1] - qs;
    const int seq_len = seq_lens[r];
    if (q_len <= 0 || seq_len <= 0) return;
    int lo, first, nsplit, chunk;
    split_range(seq_len, window, max_splits, min_chunk, lo, first, nsplit, chunk);
    if (nsplit <= 1) return;
    const long long ph = ((long long)r * gridDim.x + h) * max_splits;
    const int d = threadIdx.x;
    const int qrow = qs + q_len - 1;
    out[(long long)qrow * out_stride + (long long)h * D + d] =
        f_to_e(merged_split_output(part_lse, part_o, ph, nsplit, d));
}
