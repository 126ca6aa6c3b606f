// LayerNorm with bias and GELU for headrace (compiled at run time by NVRTC, see
// cuda/compiler.py; references in cuda/layer_ops.py).
//
// Macro set per compiled module: HR_DTYPE (0: float, 1: __half, 2: __nv_bfloat16), see
// elem_type.cuh.
// Math in fp32, one rounding to the element type at the end, as torch's kernels do.
//
// layer_norm: grid (T), block = H rounded up to a warp (<= 1024). The row is read three
//   times (mean, then the centred sum of squares, then the output); after the first read
//   it sits in L1/L2, and two passes keep the variance free of E[x^2] - E[x]^2
//   cancellation. out = (x - mean) * rstd * weight + bias.
// gelu_erf / gelu_tanh: grid (T, ceil(n / 256)), block 256; torch's exact GELU
//   x/2 (1 + erf(x / sqrt 2)) and its tanh approximation.

#include "elem_type.cuh"  // elem_t, to_f, from_f for HR_DTYPE

// Sum over the block; every thread gets the total. blockDim.x is a multiple of 32. The
// leading barrier lets one kernel call this more than once with the same shared array.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void layer_norm(const elem_t* __restrict__ x, long long x_stride,
                                      const elem_t* __restrict__ weight,
                                      const elem_t* __restrict__ bias, elem_t* __restrict__ out,
                                      int hidden, float eps) {
    const elem_t* row = x + (long long)blockIdx.x * x_stride;
    float s = 0.0f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) s += to_f(row[j]);
    const float mean = block_sum(s) / (float)hidden;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        const float d = to_f(row[j]) - mean;
        ss = fmaf(d, d, ss);
    }
    const float rstd = rsqrtf(block_sum(ss) / (float)hidden + eps);
    elem_t* orow = out + (long long)blockIdx.x * hidden;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        const float n = (to_f(row[j]) - mean) * rstd;
        orow[j] = from_f(fmaf(n, to_f(weight[j]), to_f(bias[j])));
    }
}

extern "C" __global__ void gelu_erf(const elem_t* __restrict__ x, long long x_stride,
                                    elem_t* __restrict__ out, int n) {
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const float v = to_f(x[(long long)blockIdx.x * x_stride + j]);
    out[(long long)blockIdx.x * n + j] = from_f(v * 0.5f * (1.0f + erff(v * 0.70710678118654752f)));
}

extern "C" __global__ void gelu_tanh(const elem_t* __restrict__ x, long long x_stride,
                                     elem_t* __restrict__ out, int n) {
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const float v = to_f(x[(long long)blockIdx.x * x_stride + j]);
    const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);  // sqrt(2/pi)
    out[(long long)blockIdx.x * n + j] = from_f(0.5f * v * (1.0f + tanhf(inner)));
}
