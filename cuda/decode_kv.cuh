// The decode kernel's KV element types (cuda/decode_attention.cu includes it after elem_t,
// HR_BF16 and pack_e2; cuda/compiler.py `read_source` pastes it): bytes per 8-element vector,
// its copy type, its widening to the mma's operand type (elem_t, or half for decode_tc_fp8h),
// and the Q / P operands of that type.

#pragma once

// The KV element type: bytes per 8-element vector, its copy, and its widening to 8 elem_t.
template <typename KV>
struct KvVec;

template <>
struct KvVec<elem_t> {
    static constexpr int BYTES = 16;
    typedef uint4 raw_t;
    __device__ static __forceinline__ uint4 widen(const uint4& v) { return v; }
};

template <>
struct KvVec<__nv_fp8_e4m3> {
    static constexpr int BYTES = 8;
    typedef uint2 raw_t;
    // Two FP8 values (low byte first) -> two elem_t in one word; e4m3 -> half is exact, and
    // so is half -> bf16 through float (3 mantissa bits).
    __device__ static __forceinline__ unsigned widen2(unsigned short v) {
        const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(v, __NV_E4M3);
#if HR_BF16
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
        return pack_e2(f.x, f.y);
#else
        return *reinterpret_cast<const unsigned*>(&h);
#endif
    }
    __device__ static __forceinline__ uint4 widen(const uint2& v) {
        uint4 o;
        o.x = widen2(static_cast<unsigned short>(v.x & 0xffffu));
        o.y = widen2(static_cast<unsigned short>(v.x >> 16));
        o.z = widen2(static_cast<unsigned short>(v.y & 0xffffu));
        o.w = widen2(static_cast<unsigned short>(v.y >> 16));
        return o;
    }
    // To half only: one cvt.rn.f16x2.e4m3x2 a pair (decode_tc_fp8h's math is fp16), where
    // widen2 on a bf16 module adds two half -> f32 and one f32x2 -> bf16x2 conversion.
    __device__ static __forceinline__ unsigned widen2_half(unsigned short v) {
        const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(v, __NV_E4M3);
        return *reinterpret_cast<const unsigned*>(&h);
    }
    __device__ static __forceinline__ uint4 widen_half(const uint2& v) {
        uint4 o;
        o.x = widen2_half(static_cast<unsigned short>(v.x & 0xffffu));
        o.y = widen2_half(static_cast<unsigned short>(v.x >> 16));
        o.z = widen2_half(static_cast<unsigned short>(v.y & 0xffffu));
        o.w = widen2_half(static_cast<unsigned short>(v.y >> 16));
        return o;
    }
};

// Q, P and the widened KV of one kernel's mma: elem_t (H = false) or half (H = true).
template <bool H>
__device__ __forceinline__ unsigned pack_p(float a, float b) {
    if constexpr (H) {
        __half2 v = __floats2half2_rn(a, b);
        return *reinterpret_cast<unsigned*>(&v);
    } else {
        return pack_e2(a, b);
    }
}
// A word of two elem_t as two halves (saturating: |q| beyond 65504 becomes +-65504).
template <bool H>
__device__ __forceinline__ unsigned q_word(unsigned w) {
    if constexpr (H && HR_BF16) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
        const float lim = 65504.f;
        __half2 v = __floats2half2_rn(fminf(fmaxf(f.x, -lim), lim), fminf(fmaxf(f.y, -lim), lim));
        return *reinterpret_cast<unsigned*>(&v);
    } else {
        return w;
    }
}
template <typename KV, bool H>
__device__ __forceinline__ uint4 widen_kv(const typename KvVec<KV>::raw_t& v) {
    if constexpr (H) {
        return KvVec<KV>::widen_half(v);
    } else {
        return KvVec<KV>::widen(v);
    }
}
