// Fused elementwise kernels for headrace (compiled at run time by NVRTC, see cuda/compiler.py).
//
// Macro set per compiled module: HR_DTYPE (0: float, 1: __half, 2: __nv_bfloat16), see
// elem_type.cuh.
// Each kernel reproduces the rounding of the torch code it replaces (cuda/fused_ops.py has
// the references): fp32 math, rounded to the element type exactly where torch rounds.
// Products and sums that torch computes as separate ops use the __f*_rn intrinsics, which
// the compiler never contracts into an FMA (an FMA would round once instead of twice).
//
// add_rms_norm_{vec,scalar}: grid (T), block = row units rounded up to a warp (<= 1024); the
//   row math is rms_norm.cuh's (shared with norm_quant.cu, which must match it bit for bit).
//   Pass 1: h = round(x + residual), stored as the new residual; fp32 sum of h^2.
//   Block reduction, rstd = rsqrt(sum / H + eps).
//   Pass 2: re-read h (the thread's own writes, so no barrier is needed), out =
//   round(weight * round(h * rstd)).
// rotary, rotary_kv_write: grid (T, head blocks), block = head slots x pair groups; see the
//   comment above `rotary_token`.
// silu_and_mul_{vec,scalar}: grid (T, ceil(units / 256)), block 256;
//   out = round(round(silu(gate)) * up).
// *_vec kernels move 16-byte vectors (rows, strides and pointers 16-byte aligned, checked by
// the caller); *_scalar kernels move one element at a time.

#include "rms_norm.cuh"  // elem_t, to_f, from_f (HR_DTYPE), Vec, VEC, the norm's passes

// units = H / N vectors of N elements per row. residual and res_out are null together.
template <int N>
__device__ __forceinline__ void add_rms_norm_impl(
    const elem_t* __restrict__ x, long long x_stride, const elem_t* __restrict__ residual,
    long long r_stride, const elem_t* __restrict__ weight, elem_t* __restrict__ out,
    elem_t* __restrict__ res_out, int units, float eps) {
    typedef Vec<N> vec_t;
    const float rstd = rms_norm_rstd<N>(x, x_stride, residual, r_stride, res_out, units, eps);
    const long long t = blockIdx.x;
    const vec_t* xr = reinterpret_cast<const vec_t*>(x + t * x_stride);
    const bool has_res = residual != nullptr;
    const vec_t* ro =
        has_res ? reinterpret_cast<const vec_t*>(res_out + t * (long long)units * N) : nullptr;
    const vec_t* wr = reinterpret_cast<const vec_t*>(weight);
    vec_t* orow = reinterpret_cast<vec_t*>(out + t * (long long)units * N);
    for (int j = threadIdx.x; j < units; j += blockDim.x) {
        const vec_t h = has_res ? ro[j] : xr[j];
        const vec_t w = wr[j];
        orow[j] = rms_norm_unit<N>(h, w, rstd);
    }
}

extern "C" __global__ void add_rms_norm_vec(
    const elem_t* __restrict__ x, long long x_stride, const elem_t* __restrict__ residual,
    long long r_stride, const elem_t* __restrict__ weight, elem_t* __restrict__ out,
    elem_t* __restrict__ res_out, int units, float eps) {
    add_rms_norm_impl<VEC>(x, x_stride, residual, r_stride, weight, out, res_out, units, eps);
}
extern "C" __global__ void add_rms_norm_scalar(
    const elem_t* __restrict__ x, long long x_stride, const elem_t* __restrict__ residual,
    long long r_stride, const elem_t* __restrict__ weight, elem_t* __restrict__ out,
    elem_t* __restrict__ res_out, int units, float eps) {
    add_rms_norm_impl<1>(x, x_stride, residual, r_stride, weight, out, res_out, units, eps);
}

// torch's silu: x / (1 + exp(-x)) in fp32 (IEEE division, accurate expf), rounded.
template <int N>
__device__ __forceinline__ void silu_and_mul_impl(
    const elem_t* __restrict__ x, long long x_stride, elem_t* __restrict__ out, int units) {
    typedef Vec<N> vec_t;
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= units) return;
    const long long t = blockIdx.x;
    const vec_t* gate = reinterpret_cast<const vec_t*>(x + t * x_stride);
    const vec_t g = gate[j];
    const vec_t u = gate[units + j];  // up starts I = units * N elements after gate
    vec_t o;
#pragma unroll
    for (int e = 0; e < N; ++e) {
        const float gf = to_f(g.v[e]);
        const float s = to_f(from_f(gf / (1.0f + expf(-gf))));
        o.v[e] = from_f(__fmul_rn(s, to_f(u.v[e])));
    }
    reinterpret_cast<vec_t*>(out + t * (long long)units * N)[j] = o;
}

extern "C" __global__ void silu_and_mul_vec(
    const elem_t* __restrict__ x, long long x_stride, elem_t* __restrict__ out, int units) {
    silu_and_mul_impl<VEC>(x, x_stride, out, units);
}
extern "C" __global__ void silu_and_mul_scalar(
    const elem_t* __restrict__ x, long long x_stride, elem_t* __restrict__ out, int units) {
    silu_and_mul_impl<1>(x, x_stride, out, units);
}

// --- rotary embedding -------------------------------------------------------------------------
//
// rotary: rotate the first 2 * half dims of each q and k head of a token in place (rotate-half:
// pair (x[i], x[i + half]) for i < half). rotary_kv_write: the same, and, unless
// slot_mapping[t] < 0, store the rotated key row and the value row into the cache slot: cache
// is [2][slots][Hkv][D] of elem_t (the cache's dtype is q's), v_off = slots * Hkv * D elements.
// Dims >= 2 * half (partial rotary) pass through; tokens whose position is outside [0, max_pos)
// are left as they are (the reference would raise: padding in a CUDA-graph batch must not read
// outside the table), and their K rows go to the cache unrotated.
//
// Layout of the work (the old kernels ran one 32-64 thread block per (token, head), one thread
// per pair with 2-byte accesses: 35,200 blocks at 880 tokens of Llama-3-8B):
//   grid (T, head blocks), block = pair groups x head slots. A thread owns the VP adjacent
//   pairs p .. p + VP - 1 (a pair group, half / VP of them per head) of the heads slot,
//   slot + slots, slot + 2 * slots, ... of its token (slots = all head slots of the grid's y).
//   It reads the token's cos/sin for its pairs once (VP floats each, 16-byte loads) and
//   reuses them for every head, loads x1 / x2 of up to HEAD_BATCH heads before it stores any
//   (so their loads are in flight together), and moves VP elements per access.
//   VP: 16 bytes of elements (8 for fp16/bf16, 4 for fp32) where half, head_dim, every row
//   stride and pointer allow it, else 2, else 1 (`rotary_fits`; cuda/fused_ops.py computes
//   the same for the launch shape, but the kernel covers every head under any grid and block,
//   looping over pair groups where a block is narrower than a head, so a disagreement would
//   cost speed, not correctness). The rows' loads are issued before the position arrives.
// Per 8 pairs of bf16 (32 bytes of q/k read and written): the old kernels issued 8 threads x
// (2 loads + 2 table loads + 2 stores + ~20 index/convert/math instructions); this one issues 2
// 16-byte loads, 2 16-byte stores, 48 math/convert instructions and the table once per ~4
// heads. At 880 x 40 heads the data (9 MB read, 9 MB written) is the floor: ~5 us at H200
// bandwidth from HBM, less where the qkv GEMM left it in L2 (old: 22.7 us); at 16k tokens
// 336 MB, ~95 us (old: ~420 us). Registers (sm_90, bf16): 116 (rotary), 128 (rotary_kv_write)
// with HEAD_BATCH 4 (74 / 92 with 2): ~5 blocks of 96 threads an SM, ~60 KB of loads in flight
// an SM, above the ~40 KB that HBM's latency x an SM's share of bandwidth asks for.
// The math per element is the old kernels' (and the reference's): fp32 products and the
// difference / sum each rounded (__f*_rn, never contracted), then one rounding to elem_t.

constexpr int HEAD_BATCH = 4;  // heads whose loads a thread issues before its stores
#define ROTARY_MAX_BLOCK 256  // = cuda/fused_ops.py ROTARY_BLOCK (at most)

struct RotaryArgs {
    const long long* positions;
    elem_t* q;
    long long q_tok, q_head;
    int hq;
    elem_t* k;
    long long k_tok, k_head;
    int hkv;
    const elem_t* v;  // rotary_kv_write only: null for `rotary`
    long long v_tok, v_head;
    elem_t* cache;
    long long v_off;
    const long long* slot_mapping;
    int head_dim;
    const float* cos_sin;
    long long cs_stride, max_pos;
    int half;
};

__device__ __forceinline__ bool elems_fit(const void* p, long long a, long long b, int n) {
    return reinterpret_cast<unsigned long long>(p) % (n * sizeof(elem_t)) == 0 && a % n == 0 &&
           b % n == 0;
}

// Whether VP pairs a thread (VP-element accesses of rows and table) fit this launch's layout.
template <int VP>
__device__ __forceinline__ bool rotary_fits(const RotaryArgs& a) {
    constexpr int TV = VP < 4 ? VP : 4;  // table floats per access
    bool ok = a.half % VP == 0 && elems_fit(a.q, a.q_tok, a.q_head, VP) &&
              elems_fit(a.k, a.k_tok, a.k_head, VP) &&
              reinterpret_cast<unsigned long long>(a.cos_sin) % (TV * 4) == 0 &&
              a.cs_stride % TV == 0;
    if (a.v != nullptr)
        ok = ok && a.head_dim % VP == 0 && elems_fit(a.v, a.v_tok, a.v_head, VP) &&
             elems_fit(a.cache, a.v_off, 0, VP);
    return ok;
}

template <int N>
__device__ __forceinline__ void load_table(const float* __restrict__ p, float (&out)[N]) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N / 4; ++i) {
            const float4 f = reinterpret_cast<const float4*>(p)[i];
            out[4 * i] = f.x, out[4 * i + 1] = f.y, out[4 * i + 2] = f.z, out[4 * i + 3] = f.w;
        }
    } else if constexpr (N == 2) {
        const float2 f = *reinterpret_cast<const float2*>(p);
        out[0] = f.x, out[1] = f.y;
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = p[i];
    }
}

template <int VP>
__device__ __forceinline__ void rotate_pairs(
    Vec<VP>& a, Vec<VP>& b, const float (&c)[VP], const float (&s)[VP]) {
#pragma unroll
    for (int e = 0; e < VP; ++e) {
        const float x1 = to_f(a.v[e]);
        const float x2 = to_f(b.v[e]);
        a.v[e] = from_f(__fsub_rn(__fmul_rn(x1, c[e]), __fmul_rn(x2, s[e])));
        b.v[e] = from_f(__fadd_rn(__fmul_rn(x2, c[e]), __fmul_rn(x1, s[e])));
    }
}

// Rows [from, head_dim) of src to dst, VP elements an access, by the `groups` threads of a slot.
template <int VP>
__device__ __forceinline__ void copy_row(
    elem_t* __restrict__ dst, const elem_t* __restrict__ src, int from, int head_dim, int g,
    int groups) {
    typedef Vec<VP> vec_t;
    for (int d = from + g * VP; d < head_dim; d += groups * VP)
        *reinterpret_cast<vec_t*>(dst + d) = *reinterpret_cast<const vec_t*>(src + d);
}

// One thread's heads of token blockIdx.x (see the layout above). KV: rotary_kv_write.
template <int VP, bool KV>
__device__ __forceinline__ void rotary_token(const RotaryArgs& a) {
    typedef Vec<VP> vec_t;
    const int groups = a.half / VP;  // VP divides half (rotary_fits)
    // A block narrower than a head (only where the launch's VP was wider than this one):
    // one slot per block, each thread loops over its pair groups.
    const int per_block = blockDim.x >= groups ? blockDim.x / groups : 1;
    const int slot_in_block = blockDim.x >= groups ? threadIdx.x / groups : 0;
    if (slot_in_block >= per_block) return;
    const int g_step = blockDim.x >= groups ? groups : blockDim.x;
    const int slots = gridDim.y * per_block;
    const int heads = a.hq + a.hkv;
    const long long t = blockIdx.x;
    // The rows' loads do not wait for the position: only the table's and the stores do.
    const long long pos = a.positions[t];
    const long long slot = KV ? a.slot_mapping[t] : -1;
    for (int g = threadIdx.x - slot_in_block * groups; g < groups; g += g_step) {
        const int p = g * VP;
        float c[VP], s[VP];
        bool rotate = false;  // set where the position is in the table, with its one read
        for (int h0 = blockIdx.y * per_block + slot_in_block; h0 < heads;
             h0 += HEAD_BATCH * slots) {
            elem_t* rows[HEAD_BATCH];
            vec_t x1[HEAD_BATCH], x2[HEAD_BATCH];
#pragma unroll
            for (int j = 0; j < HEAD_BATCH; ++j) {
                const int h = h0 + j * slots;
                rows[j] = h >= heads ? nullptr
                          : h < a.hq ? a.q + t * a.q_tok + h * a.q_head
                                     : a.k + t * a.k_tok + (h - a.hq) * a.k_head;
                if (rows[j] != nullptr) {
                    x1[j] = *reinterpret_cast<const vec_t*>(rows[j] + p);
                    x2[j] = *reinterpret_cast<const vec_t*>(rows[j] + a.half + p);
                }
            }
            if (!rotate && pos >= 0 && pos < a.max_pos) {
                load_table<VP>(a.cos_sin + pos * a.cs_stride + p, c);
                load_table<VP>(a.cos_sin + pos * a.cs_stride + a.half + p, s);
                rotate = true;
            }
#pragma unroll
            for (int j = 0; j < HEAD_BATCH; ++j) {
                if (rows[j] == nullptr) continue;
                if (rotate) {
                    rotate_pairs<VP>(x1[j], x2[j], c, s);
                    *reinterpret_cast<vec_t*>(rows[j] + p) = x1[j];
                    *reinterpret_cast<vec_t*>(rows[j] + a.half + p) = x2[j];
                }
                const int kh = h0 + j * slots - a.hq;
                if (!KV || kh < 0 || slot < 0) continue;
                // The thread copies to the cache what it wrote itself or what no thread
                // writes (dims past the rotated part, all of an unrotated row): no barrier.
                elem_t* ck = a.cache + (slot * a.hkv + kh) * (long long)a.head_dim;
                if (rotate) {
                    *reinterpret_cast<vec_t*>(ck + p) = x1[j];
                    *reinterpret_cast<vec_t*>(ck + a.half + p) = x2[j];
                }
                const elem_t* vrow = a.v + t * a.v_tok + kh * a.v_head;
                copy_row<VP>(ck, rows[j], rotate ? 2 * a.half : 0, a.head_dim, g, groups);
                copy_row<VP>(ck + a.v_off, vrow, 0, a.head_dim, g, groups);
            }
        }
    }
}

// The widest VP this launch's layout allows (the choice is the same for every thread).
template <bool KV>
__device__ __forceinline__ void rotary_dispatch(const RotaryArgs& a) {
    if (rotary_fits<VEC>(a))
        rotary_token<VEC, KV>(a);
    else if (rotary_fits<2>(a))
        rotary_token<2, KV>(a);
    else
        rotary_token<1, KV>(a);
}

extern "C" __global__ void __launch_bounds__(ROTARY_MAX_BLOCK) rotary(
    const long long* __restrict__ positions, elem_t* __restrict__ q, long long q_tok,
    long long q_head, int hq, elem_t* __restrict__ k, long long k_tok, long long k_head, int hkv,
    const float* __restrict__ cos_sin, long long cs_stride, long long max_pos, int half) {
    const RotaryArgs a = {positions, q,       q_tok,     q_head,  hq,     k,   k_tok,
                          k_head,    hkv,     nullptr,   0,       0,      nullptr, 0,
                          nullptr,   0,       cos_sin,   cs_stride, max_pos, half};
    rotary_dispatch<false>(a);
}

extern "C" __global__ void __launch_bounds__(ROTARY_MAX_BLOCK) rotary_kv_write(
    const long long* __restrict__ positions, elem_t* __restrict__ q, long long q_tok,
    long long q_head, int hq, elem_t* __restrict__ k, long long k_tok, long long k_head,
    const elem_t* __restrict__ v, long long v_tok, long long v_head, elem_t* __restrict__ cache,
    long long v_off, const long long* __restrict__ slot_mapping, int hkv, int head_dim,
    const float* __restrict__ cos_sin, long long cs_stride, long long max_pos, int half) {
    const RotaryArgs a = {positions, q,      q_tok,   q_head, hq,           k,        k_tok,
                          k_head,    hkv,    v,       v_tok,  v_head,       cache,    v_off,
                          slot_mapping, head_dim, cos_sin, cs_stride, max_pos, half};
    rotary_dispatch<true>(a);
}
