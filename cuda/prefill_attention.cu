// Prefill (and chunked-prefill, mixed-batch) attention for sm_90, tensor cores via mma.sync.
// Compiled at run time by NVRTC (cuda/compiler.py); host side in cuda/prefill_attention.py.
//
// Macros per compiled module: HR_BF16 (1: __nv_bfloat16, 0: __half), HR_HEAD_DIM (64|128).
// KV cache: [2, num_blocks, block_size, num_kv_heads, D] in the query dtype, V at kc + v_off;
// block_size is a run-time power of two passed as its log2 (block_shift).
//
// Rows of the attention matrix are (query token, query head of the group) pairs, row
// m = i * group + g, so the query heads sharing one KV head share every K/V tile (GQA
// packing). A block owns BM rows of one request and one KV head:
//
//   grid (num_kv_heads, batch, ceil(max_query_len * group / BM)), WARPS * 32 threads
//   blockIdx.z = 0 is the LAST row tile of every request (tiles are aligned to the end of
//   the request, so the partial tile is the first, lightest one): the blocks dispatched
//   first are the ones that see the most keys under the causal mask.
//
// Per block: Q tile [BM, D] -> shared once; K/V tiles [BN, D] stream through a STAGES-deep
// ring of shared buffers filled by cp.async (tile n + STAGES - 1 is in flight while tile n
// is computed). Shared tiles are row-major with 16-byte chunks XOR-swizzled by (row & 7),
// so the 8 rows one ldmatrix phase reads fall in 8 different bank groups.
// Each warp owns MT = BM / (16 * WARPS) mma row tiles of 16 rows:
//   S = Q K^T        mma m16n8k16 (A = Q from ldmatrix, B = K from ldmatrix, fp32 C)
//   online softmax   in registers, log2 domain (scale_log2 = scale * log2 e), ex2.approx
//   O += P V         P's fp32 C fragments repacked in registers as the bf16/fp16 A operand,
//                    V from ldmatrix.trans
// Causal alignment is bottom-right (query i of q_len sees keys <= i + seq_len - q_len);
// key tiles past the tile's last visible key are never loaded, and the mask is applied
// only on tiles some row sees partly (the diagonal; the window's lower edge).
// window > 0: sliding window, a query at p sees keys in (p - window, p]; tiles below every
// row's window are skipped.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef HR_BF16
#define HR_BF16 1
#endif
#ifndef HR_HEAD_DIM
#define HR_HEAD_DIM 128
#endif

#if HR_BF16
typedef __nv_bfloat16 elem_t;
typedef __nv_bfloat162 elem2_t;
__device__ __forceinline__ elem2_t from_f2(float a, float b) { return __floats2bfloat162_rn(a, b); }
#define HR_MMA_TYPE "bf16"
#else
typedef __half elem_t;
typedef __half2 elem2_t;
__device__ __forceinline__ elem2_t from_f2(float a, float b) { return __floats2half2_rn(a, b); }
#define HR_MMA_TYPE "f16"
#endif

namespace pf {

constexpr int D = HR_HEAD_DIM;
constexpr int CPR = D / 8;  // 16-byte chunks per row of a tile

#include "prefill_mma.cuh"  // swz, cp_async16, ldsm_x4(_t), mma16816, pack2, exp2_approx

template <int BM, int BN, int WARPS, int STAGES>
struct Tile {
    static constexpr int THREADS = WARPS * 32;
    static constexpr int MT = BM / (16 * WARPS);        // 16-row mma tiles per warp
    static constexpr bool QREG = MT == 1;                // Q fragments kept in registers
    static constexpr int ROW_STEP = THREADS / CPR;       // rows between one thread's chunks
    static constexpr int Q_ITERS = BM * CPR / THREADS;   // Q chunks each thread copies
    static constexpr int KV_ITERS = BN * CPR / THREADS;  // K (and V) chunks per thread per tile
    static constexpr int Q_BYTES = BM * D * 2;
    static constexpr int KV_BYTES = BN * D * 2;          // one K or one V tile
    // Dynamic shared memory: [pad to 1024][Q][K x STAGES][V x STAGES][pages 2 x BN][limits BM]
    // (the ldmatrix address math needs 256-byte aligned tiles; the pad makes sure of it).
    static constexpr int ALIGN = 1024;
    static constexpr int PAGE_OFF = Q_BYTES + 2 * STAGES * KV_BYTES;
    static constexpr int LIMIT_OFF = PAGE_OFF + 2 * BN * 4;
    static constexpr int SMEM_BYTES = ALIGN + LIMIT_OFF + BM * 4;
    static_assert(BM % (16 * WARPS) == 0, "whole 16-row mma tiles per warp");
    static_assert(BN % 16 == 0 && THREADS % CPR == 0, "tile shape");
    static_assert((BM * CPR) % THREADS == 0 && (BN * CPR) % THREADS == 0, "copy split");
    static_assert(STAGES >= 2, "at least double buffering");
    static_assert(THREADS >= BN, "one thread per key row reads the tile's page ids");
};

#define HR_PREFILL_ARGS                                                                      \
    const elem_t *__restrict__ q, long long q_stride, const elem_t *__restrict__ kc,         \
        long long v_off, const int *__restrict__ query_start_loc,                            \
        const int *__restrict__ seq_lens, const int *__restrict__ block_tables, int bt_stride, \
        elem_t *__restrict__ out, long long out_stride, int num_kv_heads, int group,         \
        int block_shift, float scale_log2, int window
#define HR_PREFILL_PASS                                                                  \
    q, q_stride, kc, v_off, query_start_loc, seq_lens, block_tables, bt_stride, out,     \
        out_stride, num_kv_heads, group, block_shift, scale_log2, window

template <int BM, int BN, int WARPS, int STAGES>
__device__ __forceinline__ void prefill_impl(HR_PREFILL_ARGS) {
    using T = Tile<BM, BN, WARPS, STAGES>;
    constexpr int MT = T::MT;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((T::ALIGN - smem_u32(smem_raw) % T::ALIGN) % T::ALIGN);
    unsigned dyn_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn_bytes));
    if (dyn_bytes < T::SMEM_BYTES) __trap();  // the host's smem_bytes() disagrees with Tile
    const unsigned sQ = smem_u32(smem);
    int (*sPage)[BN] = reinterpret_cast<int (*)[BN]>(smem + T::PAGE_OFF);
    int* sLimit = reinterpret_cast<int*>(smem + T::LIMIT_OFF);  // each row's last visible key
    const unsigned sK = sQ + T::Q_BYTES;               // STAGES K tiles
    const unsigned sV = sK + STAGES * T::KV_BYTES;     // STAGES V tiles

    const int kvh = blockIdx.x;
    const int r = blockIdx.y;
    const int qs = query_start_loc[r];
    const int q_len = query_start_loc[r + 1] - qs;
    const int seq_len = seq_lens[r];
    const int rows = q_len * group;
    const int m_end = rows - static_cast<int>(blockIdx.z) * BM;  // end-aligned row tiles
    if (m_end <= 0 || seq_len <= 0) return;
    const int m0 = m_end - BM;  // negative for a request's first, partial tile
    const int ctx = seq_len - q_len;  // cached tokens before this step's queries
    const int i_lo = max(m0, 0) / group;  // the tile's first and last query token
    const int i_hi = (m_end - 1) / group;
    const int kv_hi = min(seq_len, i_hi + ctx + 1);  // keys past this: no row sees them
    const int n_end = (kv_hi + BN - 1) / BN;
    const int unmasked_below = min(seq_len, i_lo + ctx + 1);  // keys every row sees
    const int n_begin = window > 0 ? max(0, i_lo + ctx - window + 1) / BN : 0;
    const int masked_below = window > 0 ? i_hi + ctx - window + 1 : 0;

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int chunk = tid % CPR;  // the 16-byte column every copy of this thread writes
    const int row0 = tid / CPR;   // its first row; then every ROW_STEP rows

    // Q tile -> shared; rows before the request (m < 0) are zero-filled.
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

    // Last visible key of each row (-1: a row before the request), for the masked tiles; the
    // first barrier of the loop orders these stores before any read.
    for (int row = tid; row < BM; row += T::THREADS) {
        const int m = m0 + row;
        sLimit[row] = m >= 0 ? m / group + ctx : -1;
    }

    const int* bt = block_tables + (long long)r * bt_stride;
    const int bmask = (1 << block_shift) - 1;
    const long long tok_stride = (long long)num_kv_heads * D;
    const elem_t* kv_head = kc + (long long)kvh * D + chunk * 8;
    // Block-table reads run ahead of the copies that use them, so a page lookup never
    // stalls a cp.async issue: in the iteration of tile n, thread `row` (< BN) reads the page
    // of row `row` of tile n + STAGES and stores it to sPage[(n + STAGES) & 1] at the end.
    auto page_of = [&](int n, int row) {
        const int j = n * BN + row;
        return j < kv_hi ? bt[j >> block_shift] : 0;
    };
    auto load_tile = [&](int n, int stage, bool from_table) {
#pragma unroll
        for (int it = 0; it < T::KV_ITERS; ++it) {
            const int row = row0 + it * T::ROW_STEP;
            const int j = n * BN + row;
            const int page = from_table ? page_of(n, row) : sPage[n & 1][row];
            const long long off = (((long long)page << block_shift) + (j & bmask)) * tok_stride;
            const unsigned dst = stage * T::KV_BYTES + swz(row, chunk);
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
    // This thread's accumulator rows: warp_row + mt * 16 + {0, 8} of the block's tile.
    const int warp_row = warp * MT * 16 + lane / 4;
    unsigned qf[T::QREG ? D / 16 : 1][4];

    int stage = 0;
    for (int n = n_begin; n < n_end; ++n) {
        cp_async_wait<STAGES - 2>();  // tile n (and Q) landed for this thread ...
        __syncthreads();              // ... and for all; every warp is done with tile n - 1
        {
            const int nn = n + STAGES - 1;  // refill the buffer tile n - 1 used
            const int st = stage == 0 ? STAGES - 1 : stage - 1;
            if (nn < n_end) load_tile(nn, st, false);
            cp_async_commit();
        }
        const int page_ahead = tid < BN ? page_of(n + STAGES, tid) : 0;
        if constexpr (T::QREG) {
            if (n == n_begin) {
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk)
                    ldsm_x4(qf[kk], sQ + swz(warp * 16 + (lane & 15), (kk * 2) | (lane >> 4)));
            }
        }

        // S = Q K^T: [MT x 16 rows, BN keys] per warp.
        float s[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
        // ldmatrix addresses: a tile row's chunk c sits at chunk c ^ (row & 7), and every row a
        // lane addresses has row & 7 == lane & 7, so the k-step's chunk offset is an XOR of
        // the lane's k-step-0 address (tiles are 256-byte aligned: row bits never change).
        const unsigned kaddr = sK + stage * T::KV_BYTES +
                               swz((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
        const unsigned qaddr = sQ + swz(warp * MT * 16 + (lane & 15), lane >> 4);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (T::QREG) {
#pragma unroll
                    for (int x = 0; x < 4; ++x) a[mt][x] = qf[kk][x];
                } else {
                    ldsm_x4(a[mt], (qaddr ^ (kk << 5)) + mt * 16 * D * 2);
                }
            }
            const unsigned kk_addr = kaddr ^ (kk << 5);
#pragma unroll
            for (int p = 0; p < BN / 16; ++p) {
                // matrices: keys 0-7 x dims lo, keys 0-7 x dims hi, keys 8-15 x lo, 8-15 x hi
                unsigned b[4];
                ldsm_x4(b, kk_addr + p * 16 * D * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816(s[mt][2 * p], a[mt], b[0], b[1]);
                    mma16816(s[mt][2 * p + 1], a[mt], b[2], b[3]);
                }
            }
        }

        const int n0 = n * BN;
        if (n0 + BN > unmasked_below || n0 < masked_below) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int limit = sLimit[warp_row + mt * 16 + hh * 8];
                    const int lower = window > 0 ? limit - window : -1;  // keys <= it hidden
#pragma unroll
                    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int j = n0 + nt * 8 + (lane & 3) * 2 + e;
                            if (j > limit || j <= lower) s[mt][nt][hh * 2 + e] = neg_inf();
                        }
                    }
                }
            }
        }

        // Online softmax; a row's 4 owning lanes (lane / 4 equal) agree on the max.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                float mx = neg_inf();
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
                    mx = fmaxf(mx, fmaxf(s[mt][nt][hh * 2], s[mt][nt][hh * 2 + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m_run[mt][hh], mx * scale_log2);
                const float base = m_new == neg_inf() ? 0.f : m_new;  // a row seeing nothing yet
                const float corr = exp2_approx(m_run[mt][hh] - base);
                m_run[mt][hh] = m_new;
                float lsum = 0.f;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float p = exp2_approx(fmaf(s[mt][nt][hh * 2 + e], scale_log2, -base));
                        s[mt][nt][hh * 2 + e] = p;
                        lsum += p;
                    }
                }
                l_run[mt][hh] = l_run[mt][hh] * corr + lsum;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    o[mt][dt][hh * 2] *= corr;
                    o[mt][dt][hh * 2 + 1] *= corr;
                }
            }
        }

        // O += P V: P's C fragments (keys 16kk..16kk+15 = n-tiles 2kk, 2kk+1) are the A
        // fragment of the k-step: a0 row r keys 0-7, a1 row r+8 keys 0-7, a2/a3 keys 8-15.
        // Packed before the first P V mma so the fp32 scores die early (register pressure).
        unsigned pk[MT][BN / 16][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                pk[mt][kk][0] = pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pk[mt][kk][1] = pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pk[mt][kk][2] = pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pk[mt][kk][3] = pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
        }
        // transposed matrices: keys 0-7 x dims lo, keys 8-15 x lo, keys 0-7 x hi, 8-15 x hi
        const unsigned vaddr = sV + stage * T::KV_BYTES +
                               swz((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            const unsigned dp_addr = vaddr ^ (dp << 5);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                unsigned b[4];
                ldsm_x4_t(b, dp_addr + kk * 16 * D * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816(o[mt][2 * dp], pk[mt][kk], b[0], b[1]);
                    mma16816(o[mt][2 * dp + 1], pk[mt][kk], b[2], b[3]);
                }
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
            const float inv = l > 0.f ? 1.f / l : 0.f;
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

}  // namespace pf

// One entry point per tile configuration: prefill_m{BM}n{BN}w{WARPS}s{STAGES}; the list must
// match CONFIGS in cuda/prefill_attention.py (tests/test_prefill_attention.py checks it).
extern "C" __global__ void __launch_bounds__(128, 2) prefill_m128n64w4s2(HR_PREFILL_ARGS) {
    pf::prefill_impl<128, 64, 4, 2>(HR_PREFILL_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 1) prefill_m128n64w8s2(HR_PREFILL_ARGS) {
    pf::prefill_impl<128, 64, 8, 2>(HR_PREFILL_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 1) prefill_m128n64w8s3(HR_PREFILL_ARGS) {
    pf::prefill_impl<128, 64, 8, 3>(HR_PREFILL_PASS);
}
extern "C" __global__ void __launch_bounds__(128, 2) prefill_m64n64w4s2(HR_PREFILL_ARGS) {
    pf::prefill_impl<64, 64, 4, 2>(HR_PREFILL_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 1) prefill_m128n128w8s2(HR_PREFILL_ARGS) {
    pf::prefill_impl<128, 128, 8, 2>(HR_PREFILL_PASS);
}
