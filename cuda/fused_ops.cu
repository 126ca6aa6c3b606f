// Fused elementwise kernels for headrace (compiled at run time by NVRTC, see cuda/compiler.py).
//
// Macro set per compiled module: HR_DTYPE (0: float, 1: __half, 2: __nv_bfloat16), see
// elem_type.cuh.
// Each kernel reproduces the rounding of the torch code it replaces (cuda/fused_ops.py has
// the references): fp32 math, rounded to the element type exactly where torch rounds.
// Products and sums that torch computes as separate ops use the __f*_rn intrinsics, which
// the compiler never contracts into an FMA (an FMA would round once instead of twice).
//
// add_rms_norm_{vec,scalar}: grid (T), block = row units rounded up to a warp (<= 1024).
//   Pass 1: h = round(x + residual), stored as the new residual; fp32 sum of h^2.
//   Block reduction, rstd = rsqrt(sum / H + eps).
//   Pass 2: re-read h (the thread's own writes, so no barrier is needed), out =
//   round(weight * round(h * rstd)).
// rotary: grid (T, Hq + Hkv), block = D/2 rounded up to a warp; thread i rotates the pair
//   (x[i], x[i + D/2]) of one head of one token, in place.
// silu_and_mul_{vec,scalar}: grid (T, ceil(units / 256)), block 256;
//   out = round(round(silu(gate)) * up).
// *_vec kernels move 16-byte vectors (rows, strides and pointers 16-byte aligned, checked by
// the caller); *_scalar kernels move one element at a time.

#include "elem_type.cuh"  // elem_t, to_f, from_f for HR_DTYPE

constexpr int VEC = 16 / sizeof(elem_t);  // elements per 16-byte vector

template <int N>
struct alignas(sizeof(elem_t) * N) Vec {
    elem_t v[N];
};

// Sum over the block; every thread gets the total. blockDim.x is a multiple of 32. Called
// once per kernel, so the shared array needs no second barrier.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// units = H / N vectors of N elements per row. residual and res_out are null together.
template <int N>
__device__ __forceinline__ void add_rms_norm_impl(
    const elem_t* __restrict__ x, long long x_stride, const elem_t* __restrict__ residual,
    long long r_stride, const elem_t* __restrict__ weight, elem_t* __restrict__ out,
    elem_t* __restrict__ res_out, int units, float eps) {
    typedef Vec<N> vec_t;
    const long long t = blockIdx.x;
    const vec_t* xr = reinterpret_cast<const vec_t*>(x + t * x_stride);
    const bool has_res = residual != nullptr;
    const vec_t* rr = has_res ? reinterpret_cast<const vec_t*>(residual + t * r_stride) : nullptr;
    vec_t* ro = has_res ? reinterpret_cast<vec_t*>(res_out + t * (long long)units * N) : nullptr;

    float ss = 0.0f;
    for (int j = threadIdx.x; j < units; j += blockDim.x) {
        vec_t h = xr[j];
        if (has_res) {
            const vec_t r = rr[j];
#pragma unroll
            for (int e = 0; e < N; ++e) h.v[e] = from_f(__fadd_rn(to_f(h.v[e]), to_f(r.v[e])));
            ro[j] = h;
        }
#pragma unroll
        for (int e = 0; e < N; ++e) {
            const float f = to_f(h.v[e]);
            ss = fmaf(f, f, ss);
        }
    }
    const float total = block_sum(ss);
    const float rstd = rsqrtf(__fadd_rn(__fmul_rn(total, 1.0f / (float)(units * N)), eps));

    const vec_t* wr = reinterpret_cast<const vec_t*>(weight);
    vec_t* orow = reinterpret_cast<vec_t*>(out + t * (long long)units * N);
    for (int j = threadIdx.x; j < units; j += blockDim.x) {
        const vec_t h = has_res ? ro[j] : xr[j];
        const vec_t w = wr[j];
        vec_t o;
#pragma unroll
        for (int e = 0; e < N; ++e) {
            const float n = to_f(from_f(__fmul_rn(to_f(h.v[e]), rstd)));
            o.v[e] = from_f(__fmul_rn(to_f(w.v[e]), n));
        }
        orow[j] = o;
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

// Tokens whose position is outside [0, max_pos) are left as they are (the reference would
// raise): padding in a CUDA-graph batch must not read outside the table.
extern "C" __global__ void rotary(
    const long long* __restrict__ positions, elem_t* __restrict__ q, long long q_tok,
    long long q_head, int hq, elem_t* __restrict__ k, long long k_tok, long long k_head,
    const float* __restrict__ cos_sin, long long cs_stride, long long max_pos, int half) {
    const int i = threadIdx.x;
    if (i >= half) return;
    const long long t = blockIdx.x;
    const int h = blockIdx.y;
    const long long pos = positions[t];
    if (pos < 0 || pos >= max_pos) return;
    elem_t* row = h < hq ? q + t * q_tok + h * q_head : k + t * k_tok + (h - hq) * k_head;
    const float c = cos_sin[pos * cs_stride + i];
    const float s = cos_sin[pos * cs_stride + half + i];
    const float x1 = to_f(row[i]);
    const float x2 = to_f(row[i + half]);
    row[i] = from_f(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
    row[i + half] = from_f(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
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

// rotary_kv_write: rotary and the KV-cache write in one launch (cuda/kv_write_rotary.py).
// grid (T, Hq + Hkv), block = D/2 rounded up to a warp (<= 1024), as `rotary`.
//   y <  Hq: rotate query head y of token t in place (exactly `rotary`).
//   y >= Hq: rotate key head y - Hq in place, then, unless slot_mapping[t] < 0, store the
//            rotated key row and the value row into the cache slot. cache is [2][slots][Hkv]
//            [D] of elem_t (the cache's dtype is q's); v_off = slots * Hkv * D elements.
// Dims >= 2 * half (partial rotary) and tokens outside the table pass through unrotated.
// Thread i owns dims i and i + half of the rotated part, so each thread copies to the cache
// only what it wrote (or what no thread writes): no barrier is needed.
extern "C" __global__ void rotary_kv_write(
    const long long* __restrict__ positions, elem_t* __restrict__ q, long long q_tok,
    long long q_head, int hq, elem_t* __restrict__ k, long long k_tok, long long k_head,
    const elem_t* __restrict__ v, long long v_tok, long long v_head, elem_t* __restrict__ cache,
    long long v_off, const long long* __restrict__ slot_mapping, int hkv, int head_dim,
    const float* __restrict__ cos_sin, long long cs_stride, long long max_pos, int half) {
    const int i = threadIdx.x;
    const long long t = blockIdx.x;
    const int h = blockIdx.y;
    const long long pos = positions[t];
    const bool rotate = pos >= 0 && pos < max_pos;
    float c = 1.0f, s = 0.0f;
    if (rotate && i < half) {
        c = cos_sin[pos * cs_stride + i];
        s = cos_sin[pos * cs_stride + half + i];
    }
    if (h < hq) {
        if (!rotate || i >= half) return;
        elem_t* row = q + t * q_tok + h * q_head;
        const float x1 = to_f(row[i]);
        const float x2 = to_f(row[i + half]);
        row[i] = from_f(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
        row[i + half] = from_f(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
        return;
    }
    const int kh = h - hq;
    elem_t* krow = k + t * k_tok + kh * k_head;
    const long long slot = slot_mapping[t];
    elem_t* ck = slot >= 0 ? cache + (slot * hkv + kh) * (long long)head_dim : nullptr;
    if (rotate && i < half) {
        const float x1 = to_f(krow[i]);
        const float x2 = to_f(krow[i + half]);
        const elem_t r1 = from_f(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
        const elem_t r2 = from_f(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
        krow[i] = r1;
        krow[i + half] = r2;
        if (ck != nullptr) {
            ck[i] = r1;
            ck[i + half] = r2;
        }
    }
    if (ck == nullptr) return;
    for (int d = (rotate ? 2 * half : 0) + i; d < head_dim; d += blockDim.x) ck[d] = krow[d];
    const elem_t* vrow = v + t * v_tok + kh * v_head;
    elem_t* cv = ck + v_off;
    for (int d = i; d < head_dim; d += blockDim.x) cv[d] = vrow[d];
}
