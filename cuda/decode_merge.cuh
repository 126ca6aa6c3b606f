// The tensor-core decode kernel's fused split merge (cuda/decode_attention.cu includes it
// after its D, THREADS, elem_t, f_to_e and neg_inf; cuda/compiler.py `read_source` pastes it).

#pragma once

// The fused merge: the last of a request's live splits to finish (per KV head and head
// chunk: counters[r * gridDim.y + blockIdx.y]) combines every split's partial into the
// output and puts the counter back to 0 for the next launch (stream-ordered after this one,
// so a graph replays it as well). Partials are read through L2 (__ldcg): other SMs wrote them.
__device__ __forceinline__ void merge_if_last(int* __restrict__ counters, int nsplit, int r,
                                           int head0, int gcount, int num_q_heads, int qrow,
                                           elem_t* __restrict__ out, long long out_stride,
                                           const float* __restrict__ part_o,
                                           const float* __restrict__ part_lse,
                                           float* merge_scratch) {
    __shared__ int last;
    __threadfence();  // this block's partials are visible device-wide before it is counted
    __syncthreads();
    if (threadIdx.x == 0) {
        int* c = counters + (long long)r * gridDim.y + blockIdx.y;
        last = atomicAdd(c, 1) == nsplit - 1;
        if (last) *c = 0;  // every live split has counted: none touches it again
        __threadfence();
    }
    __syncthreads();
    if (!last) return;
#if HR_DECODE_MERGE3
    // Plan v3's merge: the splits' weights once per head in shared memory (the stages are
    // free: the block's combine is done), then each output's partials in one batch of
    // loads. The loop below instead pays two dependent L2 round trips per THREADS outputs
    // (8 rounds for 64 threads x 4 heads x 128 dims).
    float* wts = merge_scratch;  // [gcount][nsplit]: exp2(lse - max) / sum
    for (int i = threadIdx.x; i < gcount * nsplit; i += THREADS) {
        const int g = i / nsplit, s = i % nsplit;
        wts[i] = __ldcg(part_lse + ((long long)r * num_q_heads + head0 + g) * gridDim.x + s);
    }
    __syncthreads();
    if (threadIdx.x < gcount) {
        float* w = wts + threadIdx.x * nsplit;
        float mx = neg_inf();
        for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, w[s]);
        const float base = mx == neg_inf() ? 0.f : mx;
        float L = 0.f;
        for (int s = 0; s < nsplit; ++s) {
            w[s] = exp2f(w[s] - base);  // empty split: 0
            L += w[s];
        }
        const float inv = L > 0.f ? 1.f / L : 0.f;
        for (int s = 0; s < nsplit; ++s) w[s] *= inv;
    }
    __syncthreads();
#pragma unroll 4
    for (int idx = threadIdx.x; idx < gcount * D; idx += THREADS) {
        const int g = idx / D, d = idx % D;
        const long long ph = ((long long)r * num_q_heads + head0 + g) * gridDim.x;
        const float* w = wts + g * nsplit;
        float O = 0.f;
#pragma unroll 8
        for (int s = 0; s < nsplit; ++s) O = fmaf(w[s], __ldcg(part_o + (ph + s) * D + d), O);
        out[(long long)qrow * out_stride + (long long)(head0 + g) * D + d] = f_to_e(O);
    }
#else
    for (int idx = threadIdx.x; idx < gcount * D; idx += THREADS) {
        const int g = idx / D, d = idx % D;
        const long long ph = ((long long)r * num_q_heads + head0 + g) * gridDim.x;
        float mx = neg_inf();
        for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, __ldcg(part_lse + ph + s));
        const float base = mx == neg_inf() ? 0.f : mx;
        float L = 0.f, O = 0.f;
        for (int s = 0; s < nsplit; ++s) {
            const float w = exp2f(__ldcg(part_lse + ph + s) - base);  // empty split: 0
            L += w;
            O = fmaf(w, __ldcg(part_o + (ph + s) * D + d), O);
        }
        out[(long long)qrow * out_stride + (long long)(head0 + g) * D + d] =
            f_to_e(L > 0.f ? O / L : 0.f);
    }
#endif
}
