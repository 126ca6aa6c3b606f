// Prefill attention (round 2, the prefill tile kernel since session 8; the first tile kernel,
// round 1, was removed once this one beat it on every shape). Host side in cuda/prefill_v2.py;
// routing in cuda/prefill_attention.py.
//
// Macros per compiled module: HR_BF16 (1: __nv_bfloat16, 0: __half), HR_HEAD_DIM (64|128),
// HR_KV_FP8 (0: the KV cache holds elem_t; 1: float8_e4m3fn bytes holding K / k_scale and
// V / v_scale). KV cache: [2, num_blocks, block_size, num_kv_heads, D], V at kc + v_off.
//
// The tile structure, from round 1 (GQA rows m = i * group + g packed into one tile per KV head, grid
// (num_kv_heads, batch, row tiles) with z = 0 the heaviest, end-aligned tile, a cp.async K/V
// ring into XOR-swizzled shared tiles, ldmatrix + mma.sync m16n8k16, online softmax in the
// log2 domain, bottom-right causal alignment, sliding windows), aimed at its profile
// (255 registers with spills; fixed-latency dependency the top stall; the shared-memory pipe
// the busiest):
//   - SUB keys per softmax step: a BN-key tile is scored, softmaxed and multiplied into O in
//     BN / SUB steps, so S needs MT * SUB / 2 registers instead of MT * BN / 2; the register
//     file of the 32-rows-per-warp tile then holds O without spilling.
//   - Lazy rescale: a row's running max moves only when a step's max passes it by more than
//     RESCALE_LOG2 (P then stays below 2^RESCALE_LOG2, exact in fp32 accumulation); the
//     warp votes, so O's MT * D / 2 multiplies run only on the rare steps that need them.
//   - Row max and row sum as trees (depth log2 n instead of n dependent instructions).
//   - Q fragments in registers across the key loop where they fit (MT * D <= 128: 16 rows
//     per warp, or 32 rows at head_dim 64): no Q ldmatrix in the loop.
//   - Sub-steps past a warp's last visible key are skipped (the diagonal tile costs each
//     warp only the keys its own rows see).
//   - FP8 KV: cp.async copies the 8-bit tiles into a raw ring; after they land, the block
//     widens them once into one 16-bit K and V tile (e4m3 -> half is exact, half -> bf16 too:
//     3 mantissa bits), then computes as on a 16-bit cache. k_scale is in scale_log2 (the
//     host folds it), v_scale multiplies the output.
// Grids: the z grid above, or (HEADRACE_PREFILL_GRID=flat; tile_map non-null) the flat grid
// (num_kv_heads, N): block y runs tile_map[y] = (request, z), the host's list of the tiles
// with work, heaviest first (cuda/prefill_tiles.py); a mixed step's decode rows then launch
// no empty z tiles. Either way the same per-tile code runs, so both give identical outputs.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#ifndef HR_HEAD_DIM
#define HR_HEAD_DIM 128
#endif
#ifndef HR_KV_FP8
#define HR_KV_FP8 0
#endif

#include "elem2_type.cuh"  // elem_t, elem2_t, from_f2, HR_MMA_TYPE for HR_BF16

#if HR_KV_FP8
typedef unsigned char kv_t;  // __nv_fp8_e4m3 storage
#else
typedef elem_t kv_t;
#endif

namespace pf2 {

constexpr int D = HR_HEAD_DIM;
constexpr int CPR = D / 8;  // 16-byte chunks per row of a 16-bit tile
constexpr bool KV_FP8 = HR_KV_FP8 != 0;
constexpr int KV_BYTES_PER_ELEM = KV_FP8 ? 1 : 2;
constexpr int RCPR = D * KV_BYTES_PER_ELEM / 16;  // 16-byte chunks per row of a raw K/V tile
// A row's max moves only when a step's max passes it by more than this (log2 units): P
// stays <= 2^8, which bf16/fp16 hold to their usual relative precision.
constexpr float RESCALE_LOG2 = 8.f;

#include "prefill_mma.cuh"  // swz, cp_async16, ldsm_x4(_t), mma16816, pack2, exp2_approx

// Two FP8 e4m3 values (low byte first) -> two elem_t in one word.
__device__ __forceinline__ unsigned widen_fp8x2(unsigned short v) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(v, __NV_E4M3);
#if HR_BF16
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
    return pack2(f.x, f.y);
#else
    return *reinterpret_cast<const unsigned*>(&h);
#endif
}

template <int BM, int BN, int WARPS, int STAGES, int SUB>
struct Tile {
    static constexpr int THREADS = WARPS * 32;
    static constexpr int MT = BM / (16 * WARPS);           // 16-row mma tiles per warp
    static constexpr bool QREG = MT * D <= 128;             // Q fragments live in registers
    static constexpr int ROW_STEP = THREADS / CPR;          // Q: rows between a thread's chunks
    static constexpr int Q_ITERS = BM * CPR / THREADS;
    static constexpr int RAW_ROW_STEP = THREADS / RCPR;     // K/V raw copies likewise
    static constexpr int KV_ITERS = BN * RCPR / THREADS;
    static constexpr int WIDEN_ITERS = BN * CPR / THREADS;  // FP8: 8-element chunks per thread
    static constexpr int Q_BYTES = BM * D * 2;
    static constexpr int TILE_BYTES = BN * D * 2;           // one 16-bit K or V tile
    static constexpr int RAW_BYTES = BN * D * KV_BYTES_PER_ELEM;  // one K or V tile as stored
    // 16-bit caches: the ring holds the tiles ldmatrix reads (STAGES K, STAGES V). FP8: the
    // ring holds raw bytes and one 16-bit K and V tile follows it.
    static constexpr int WIDE_OFF = Q_BYTES + 2 * STAGES * RAW_BYTES;
    // Dynamic shared memory: [pad to 1024][Q][K ring][V ring]([K16][V16])[pages 2 x BN][limits BM]
    static constexpr int ALIGN = 1024;
    static constexpr int PAGE_OFF = WIDE_OFF + (KV_FP8 ? 2 * TILE_BYTES : 0);
    static constexpr int LIMIT_OFF = PAGE_OFF + 2 * BN * 4;
    static constexpr int SMEM_BYTES = ALIGN + LIMIT_OFF + BM * 4;
    static_assert(BM % (16 * WARPS) == 0, "whole 16-row mma tiles per warp");
    static_assert(BN % SUB == 0 && SUB % 16 == 0, "whole 16-key sub-steps");
    static_assert(THREADS % CPR == 0 && THREADS % RCPR == 0, "tile shape");
    static_assert((BM * CPR) % THREADS == 0 && (BN * RCPR) % THREADS == 0, "copy split");
    static_assert((BN * CPR) % THREADS == 0, "widen split");
    static_assert(STAGES >= 2, "at least double buffering");
    static_assert(THREADS >= BN, "one thread per key row reads the tile's page ids");
};

#define HR_PREFILL2_ARGS                                                                     \
    const elem_t *__restrict__ q, long long q_stride, const kv_t *__restrict__ kc,           \
        long long v_off, const int *__restrict__ query_start_loc,                            \
        const int *__restrict__ seq_lens, const int *__restrict__ block_tables, int bt_stride, \
        elem_t *__restrict__ out, long long out_stride, int num_kv_heads, int group,         \
        int block_shift, float scale_log2, float v_scale, int window,                        \
        const int2 *__restrict__ tile_map
#define HR_PREFILL2_PASS                                                                 \
    q, q_stride, kc, v_off, query_start_loc, seq_lens, block_tables, bt_stride, out,     \
        out_stride, num_kv_heads, group, block_shift, scale_log2, v_scale, window, tile_map

// max / sum of n values as a tree (n a power of two, compile time).
template <int N>
__device__ __forceinline__ float tree_max(const float* v) {
    if constexpr (N == 1) {
        return v[0];
    } else {
        return fmaxf(tree_max<N / 2>(v), tree_max<N / 2>(v + N / 2));
    }
}
template <int N>
__device__ __forceinline__ float tree_sum(const float* v) {
    if constexpr (N == 1) {
        return v[0];
    } else {
        return tree_sum<N / 2>(v) + tree_sum<N / 2>(v + N / 2);
    }
}

// FP8: the block widens raw K/V tile `raw` (row-major bytes) into the swizzled 16-bit tiles.
template <class T>
__device__ __forceinline__ void widen_tiles(unsigned raw_k, unsigned raw_v, unsigned wide_k,
                                            unsigned wide_v, int tid) {
    // Not unrolled: O's accumulators are live here, and each step needs only a few registers.
#pragma unroll 1
    for (int it = 0; it < T::WIDEN_ITERS; ++it) {
        const int u = tid + it * T::THREADS;
        const int row = u / CPR, c = u % CPR;
        const unsigned src = static_cast<unsigned>((row * D + c * 8));
#pragma unroll
        for (int kv = 0; kv < 2; ++kv) {
            unsigned lo, hi;
            asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];\n"
                         : "=r"(lo), "=r"(hi)
                         : "r"((kv ? raw_v : raw_k) + src));
            const unsigned w0 = widen_fp8x2(static_cast<unsigned short>(lo & 0xffffu));
            const unsigned w1 = widen_fp8x2(static_cast<unsigned short>(lo >> 16));
            const unsigned w2 = widen_fp8x2(static_cast<unsigned short>(hi & 0xffffu));
            const unsigned w3 = widen_fp8x2(static_cast<unsigned short>(hi >> 16));
            asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(
                             (kv ? wide_v : wide_k) + swz(row, c)),
                         "r"(w0), "r"(w1), "r"(w2), "r"(w3));
        }
    }
}

template <int BM, int BN, int WARPS, int STAGES, int SUB, bool PIPE>
__device__ __forceinline__ void prefill_v2_impl(HR_PREFILL2_ARGS) {
    using T = Tile<BM, BN, WARPS, STAGES, SUB>;
    constexpr int MT = T::MT;
    constexpr int NS = SUB / 8;  // n-tiles of 8 keys per sub-step
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((T::ALIGN - smem_u32(smem_raw) % T::ALIGN) % T::ALIGN);
    unsigned dyn_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn_bytes));
    if (dyn_bytes < T::SMEM_BYTES) __trap();  // the host's smem_bytes() disagrees with Tile
    const unsigned sQ = smem_u32(smem);
    int (*sPage)[BN] = reinterpret_cast<int (*)[BN]>(smem + T::PAGE_OFF);
    int* sLimit = reinterpret_cast<int*>(smem + T::LIMIT_OFF);  // each row's last visible key
    const unsigned sK = sQ + T::Q_BYTES;             // STAGES K tiles (raw bytes for FP8)
    const unsigned sV = sK + STAGES * T::RAW_BYTES;  // STAGES V tiles
    const unsigned sK16 = sQ + T::WIDE_OFF;          // FP8 only: the widened K and V
    const unsigned sV16 = sK16 + T::TILE_BYTES;

    const int kvh = blockIdx.x;
    // z grid: block (y, z) is request y's row tile z. Flat grid: the host's tile map lists
    // only the (request, row tile) pairs with work, heaviest first, and block y reads its own.
    int r = blockIdx.y, z = blockIdx.z;
    if (tile_map != nullptr) {
        const int2 t = tile_map[blockIdx.y];
        r = t.x;
        z = t.y;
    }
    const int qs = query_start_loc[r];
    const int q_len = query_start_loc[r + 1] - qs;
    const int seq_len = seq_lens[r];
    const int rows = q_len * group;
    const int m_end = rows - z * BM;  // end-aligned row tiles
    if (m_end <= 0 || seq_len <= 0) return;
    const int m0 = m_end - BM;  // negative for a request's first, partial tile
    const int ctx = seq_len - q_len;
    const int i_lo = max(m0, 0) / group;
    const int i_hi = (m_end - 1) / group;
    const int kv_hi = min(seq_len, i_hi + ctx + 1);  // keys past this: no row sees them
    const int n_end = (kv_hi + BN - 1) / BN;
    const int unmasked_below = min(seq_len, i_lo + ctx + 1);  // keys every row sees
    const int n_begin = window > 0 ? max(0, i_lo + ctx - window + 1) / BN : 0;
    const int masked_below = window > 0 ? i_hi + ctx - window + 1 : 0;

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    // The last key any row of this warp sees (rows before the request see none).
    const int warp_last_row = m0 + warp * MT * 16 + MT * 16 - 1;
    const int warp_kv_hi = warp_last_row >= 0 ? min(kv_hi, warp_last_row / group + ctx + 1) : 0;

    {
        const int chunk = tid % CPR;
        const int row0 = tid / CPR;
#pragma unroll
        for (int it = 0; it < T::Q_ITERS; ++it) {
            const int row = row0 + it * T::ROW_STEP;
            const int m = m0 + row;
            const elem_t* src = q;
            if (m >= 0) {
                const int tok = qs + m / group;
                const int h = kvh * group + m % group;
                src = q + (long long)tok * q_stride + (long long)h * D + chunk * 8;
            }
            cp_async16(sQ + swz(row, chunk), src, m >= 0);
        }
    }
    for (int row = tid; row < BM; row += T::THREADS) {
        const int m = m0 + row;
        sLimit[row] = m >= 0 ? m / group + ctx : -1;
    }

    // The request's block-table row, re-derived at each use rather than kept: the flat grid
    // re-reads r from the tile map (a volatile load the compiler cannot hoist into a register
    // that lives across the key loop; it hits L1), since the z grid's r, blockIdx.y, costs no
    // register, and the register-bound tiles (255 at head_dim 128) spill with one more.
    auto bt_row = [&]() -> const int* {
        int rr = blockIdx.y;
        if (tile_map != nullptr)
            asm volatile("ld.global.nc.s32 %0, [%1];\n" : "=r"(rr) : "l"(&tile_map[blockIdx.y].x));
        return block_tables + (long long)rr * bt_stride;
    };
    const int bmask = (1 << block_shift) - 1;
    const long long tok_stride = (long long)num_kv_heads * D;  // elements of kv_t
    const int rchunk = tid % RCPR;
    const int rrow0 = tid / RCPR;
    const kv_t* kv_head = kc + (long long)kvh * D + rchunk * (16 / KV_BYTES_PER_ELEM);
    auto page_of = [&](int n, int row) {
        const int j = n * BN + row;
        return j < kv_hi ? bt_row()[j >> block_shift] : 0;
    };
    // Raw tiles: 16-bit ones are swizzled (ldmatrix reads them); FP8 ones row-major (only the
    // widening reads them, 8 bytes a thread, whole rows per warp).
    auto raw_dst = [&](int row) -> unsigned {
        if constexpr (KV_FP8) {
            return static_cast<unsigned>((row * RCPR + rchunk) * 16);
        } else {
            return swz(row, rchunk);
        }
    };
    auto load_tile = [&](int n, int stage, bool from_table) {
#pragma unroll
        for (int it = 0; it < T::KV_ITERS; ++it) {
            const int row = rrow0 + it * T::RAW_ROW_STEP;
            const int j = n * BN + row;
            const int page = from_table ? page_of(n, row) : sPage[n & 1][row];
            const long long off = (((long long)page << block_shift) + (j & bmask)) * tok_stride;
            const unsigned dst = stage * T::RAW_BYTES + raw_dst(row);
            cp_async16(sK + dst, kv_head + off, j < kv_hi);
            cp_async16(sV + dst, kv_head + v_off + off, j < kv_hi);
        }
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (n_begin + s < n_end) load_tile(n_begin + s, s, true);
        cp_async_commit();  // group s: tile n_begin + s (group 0 also holds Q)
    }
    if (tid < BN) sPage[(n_begin + STAGES - 1) & 1][tid] = page_of(n_begin + STAGES - 1, tid);

    float o[MT][D / 8][4];
    float m_run[MT][2], l_run[MT][2];  // running max (log2 units) and partial row sums
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
        m_run[mt][0] = m_run[mt][1] = neg_inf();
        l_run[mt][0] = l_run[mt][1] = 0.f;
    }
    const int warp_row = warp * MT * 16 + lane / 4;
    unsigned qf[T::QREG ? MT : 1][T::QREG ? D / 16 : 1][4];

    int stage = 0;
    for (int n = n_begin; n < n_end; ++n) {
        cp_async_wait<STAGES - 2>();  // tile n (and Q) landed for this thread ...
        __syncthreads();              // ... and for all; every warp is done with tile n - 1
        {
            const int nn = n + STAGES - 1;
            const int st = stage == 0 ? STAGES - 1 : stage - 1;
            if (nn < n_end) load_tile(nn, st, false);
            cp_async_commit();
        }
        const int page_ahead = tid < BN ? page_of(n + STAGES, tid) : 0;
        if constexpr (T::QREG) {
            if (n == n_begin) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int kk = 0; kk < D / 16; ++kk)
                        ldsm_x4(qf[mt][kk], sQ + swz(warp * MT * 16 + mt * 16 + (lane & 15),
                                                     (kk * 2) | (lane >> 4)));
            }
        }
        unsigned tK = sK + stage * T::RAW_BYTES, tV = sV + stage * T::RAW_BYTES;
        if constexpr (KV_FP8) {
            widen_tiles<T>(tK, tV, sK16, sV16, tid);
            __syncthreads();  // the widened tiles are whole before any warp reads them
            tK = sK16;
            tV = sV16;
        }
        const unsigned kaddr = tK + swz((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
        const unsigned vaddr = tV + swz((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
        const unsigned qaddr = sQ + swz(warp * MT * 16 + (lane & 15), lane >> 4);

        // S = Q K^T for keys n * BN + u * SUB .. + SUB - 1: [MT x 16 rows, SUB keys] per warp.
        auto score = [&](const int u, float (&s)[MT][NS][4]) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NS; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                unsigned a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if constexpr (T::QREG) {
#pragma unroll
                        for (int x = 0; x < 4; ++x) a[mt][x] = qf[mt][kk][x];
                    } else {
                        ldsm_x4(a[mt], (qaddr ^ (kk << 5)) + mt * 16 * D * 2);
                    }
                }
                const unsigned kk_addr = (kaddr ^ (kk << 5)) + u * SUB * D * 2;
#pragma unroll
                for (int p = 0; p < SUB / 16; ++p) {
                    unsigned b[4];
                    ldsm_x4(b, kk_addr + p * 16 * D * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816(s[mt][2 * p], a[mt], b[0], b[1]);
                        mma16816(s[mt][2 * p + 1], a[mt], b[2], b[3]);
                    }
                }
            }
        };
        // Mask, online softmax (lazy rescale) and O += P V for those keys.
        auto consume = [&](const int u, float (&s)[MT][NS][4]) {
            const int n0 = n * BN + u * SUB;

            if (n0 + SUB > unmasked_below || n0 < masked_below) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const int limit = sLimit[warp_row + mt * 16 + hh * 8];
                        const int lower = window > 0 ? limit - window : -1;
#pragma unroll
                        for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const int j = n0 + nt * 8 + (lane & 3) * 2 + e;
                                if (j > limit || j <= lower) s[mt][nt][hh * 2 + e] = neg_inf();
                            }
                        }
                    }
                }
            }

            // Row maxima (log2 units); a row's 4 owning lanes agree after the shuffles.
            float mx[MT][2];
            bool grow = false;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    float v[2 * NS];
#pragma unroll
                    for (int nt = 0; nt < NS; ++nt) {
                        v[2 * nt] = s[mt][nt][hh * 2];
                        v[2 * nt + 1] = s[mt][nt][hh * 2 + 1];
                    }
                    float x = tree_max<2 * NS>(v);
                    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
                    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
                    mx[mt][hh] = x * scale_log2;
                    grow |= mx[mt][hh] > m_run[mt][hh] + RESCALE_LOG2;
                }
            }
            // Lazy rescale: the warp moves its rows' maxima only when one of them grew past
            // the threshold (always on a row's first visible keys: m_run = -inf).
            if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const float m_new = fmaxf(m_run[mt][hh], mx[mt][hh]);
                        const float corr =
                            m_new == neg_inf() ? 1.f : exp2_approx(m_run[mt][hh] - m_new);
                        m_run[mt][hh] = m_new;
                        l_run[mt][hh] *= corr;
#pragma unroll
                        for (int dt = 0; dt < D / 8; ++dt) {
                            o[mt][dt][hh * 2] *= corr;
                            o[mt][dt][hh * 2 + 1] *= corr;
                        }
                    }
                }
            }
            // P = 2^(s * scale_log2 - m_run) (a row that saw nothing yet: base 0, P = 0).
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const float base = m_run[mt][hh] == neg_inf() ? 0.f : m_run[mt][hh];
                    float v[2 * NS];
#pragma unroll
                    for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const float p =
                                exp2_approx(fmaf(s[mt][nt][hh * 2 + e], scale_log2, -base));
                            s[mt][nt][hh * 2 + e] = p;
                            v[2 * nt + e] = p;
                        }
                    }
                    l_run[mt][hh] += tree_sum<2 * NS>(v);
                }
            }

            // O += P V over these SUB keys (P's C fragments are the A operand of the k-step).
            unsigned pk[MT][SUB / 16][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int kk = 0; kk < SUB / 16; ++kk) {
                    pk[mt][kk][0] = pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    pk[mt][kk][1] = pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    pk[mt][kk][2] = pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    pk[mt][kk][3] = pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
            }
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                const unsigned dp_addr = (vaddr ^ (dp << 5)) + u * SUB * D * 2;
#pragma unroll
                for (int kk = 0; kk < SUB / 16; ++kk) {
                    unsigned b[4];
                    ldsm_x4_t(b, dp_addr + kk * 16 * D * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816(o[mt][2 * dp], pk[mt][kk], b[0], b[1]);
                        mma16816(o[mt][2 * dp + 1], pk[mt][kk], b[2], b[3]);
                    }
                }
            }
        };
        if constexpr (PIPE) {
            // The next step's Q K^T is issued before this step's softmax, so the tensor pipe
            // works through it while the softmax's dependent chain runs (and this step's
            // P V while the next softmax runs).
            float sa[MT][NS][4], sb[MT][NS][4];
            if (n * BN < warp_kv_hi) score(0, sa);
#pragma unroll
            for (int u = 0; u < BN / SUB; ++u) {
                const int n0 = n * BN + u * SUB;
                if (n0 >= warp_kv_hi) break;  // no row of this warp sees these keys
                if (u + 1 < BN / SUB && n0 + SUB < warp_kv_hi) score(u + 1, (u & 1) ? sa : sb);
                consume(u, (u & 1) ? sb : sa);
            }
        } else {
#pragma unroll
            for (int u = 0; u < BN / SUB; ++u) {
                if (n * BN + u * SUB >= warp_kv_hi) break;  // no row of this warp sees these keys
                float s[MT][NS][4];
                score(u, s);
                consume(u, s);
            }
        }
        if (tid < BN) sPage[(n + STAGES) & 1][tid] = page_ahead;  // read after the next barrier
        stage = stage + 1 == STAGES ? 0 : stage + 1;
    }
    cp_async_wait<0>();

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float l = l_run[mt][hh];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int rr = m0 + warp_row + mt * 16 + hh * 8;
            if (rr < 0) continue;  // before the request (rr < m_end <= rows always)
            const float inv = l > 0.f ? v_scale / l : 0.f;
            const int tok = qs + rr / group;
            const int h = kvh * group + rr % group;
            elem_t* dst = out + (long long)tok * out_stride + (long long)h * D + (lane & 3) * 2;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
                *reinterpret_cast<elem2_t*>(dst + dt * 8) =
                    from_f2(o[mt][dt][hh * 2] * inv, o[mt][dt][hh * 2 + 1] * inv);
        }
    }
}

}  // namespace pf2

// One entry point per configuration: prefill2_m{BM}n{BN}w{WARPS}s{STAGES}k{SUB}; the list must
// match CONFIGS in cuda/prefill_v2.py (tests/test_prefill_v2.py checks it).
extern "C" __global__ void __launch_bounds__(128, 2) prefill2_m128n64w4s2k32(HR_PREFILL2_ARGS) {
    pf2::prefill_v2_impl<128, 64, 4, 2, 32, false>(HR_PREFILL2_PASS);
}
extern "C" __global__ void __launch_bounds__(128, 2) prefill2_m128n64w4s2k64(HR_PREFILL2_ARGS) {
    pf2::prefill_v2_impl<128, 64, 4, 2, 64, false>(HR_PREFILL2_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 1) prefill2_m128n64w8s2k64(HR_PREFILL2_ARGS) {
    pf2::prefill_v2_impl<128, 64, 8, 2, 64, false>(HR_PREFILL2_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 1) prefill2_m128n128w8s2k64(HR_PREFILL2_ARGS) {
    pf2::prefill_v2_impl<128, 128, 8, 2, 64, false>(HR_PREFILL2_PASS);
}
extern "C" __global__ void __launch_bounds__(128, 2) prefill2_m128n64w4s2k32p(HR_PREFILL2_ARGS) {
    pf2::prefill_v2_impl<128, 64, 4, 2, 32, true>(HR_PREFILL2_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 1) prefill2_m128n128w8s2k32p(HR_PREFILL2_ARGS) {
    pf2::prefill_v2_impl<128, 128, 8, 2, 32, true>(HR_PREFILL2_PASS);
}
