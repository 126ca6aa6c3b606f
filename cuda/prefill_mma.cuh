// The mma.sync building blocks of the prefill kernel (one user now: prefill_attention_v2.cu,
// round 2; a header of its own so that a later tile kernel can share them): swizzled 16-bit
// tiles, cp.async, ldmatrix, m16n8k16 and packing. Included inside the kernel's namespace,
// after it defines D, CPR (16-byte chunks per tile row), elem2_t, from_f2 and HR_MMA_TYPE.
#pragma once

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 2^x; ex2.approx(-inf) = +0, which the masking relies on.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Byte offset of chunk `chunk` (8 elements) of row `row` in a swizzled [rows][D] tile.
__device__ __forceinline__ unsigned swz(int row, int chunk) {
    return static_cast<unsigned>((row * CPR + (chunk ^ (row & 7))) * 16);
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; pred false zero-fills the destination and reads nothing.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b: A 16x16 row-major (a[0..3] = rows r/r+8 x cols 0-7, then cols 8-15), B 16x8
// col-major (b0 = k 0-7, b1 = k 8-15), C 16x8 (c0,c1 row lane/4, c2,c3 row lane/4 + 8,
// cols 2 * (lane % 4) + {0, 1}).
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
