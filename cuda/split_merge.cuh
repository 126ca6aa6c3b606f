// Flash-decoding's merge of one (request, query head): the splits' partial outputs weighted
// by their log2-sum-exp, for output dimension d. Shared by the old decode kernels
// (paged_attention_kernels.cu merge_splits) and the tensor-core one (decode_attention.cu
// decode_tc_merge); cuda/compiler.py `read_source` pastes it where it is included, after
// the including file's D and neg_inf().
//
// part_lse [.., max_splits]: each split's log2 of its softmax sum plus its max (-inf: empty)
// part_o   [.., max_splits, D]: each split's normalized output; ph: this head's first split.

#pragma once

__device__ __forceinline__ float merged_split_output(
    const float* __restrict__ part_lse, const float* __restrict__ part_o, long long ph,
    int nsplit, int d) {
    float mx = neg_inf();
    for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, part_lse[ph + s]);
    const float base = mx == neg_inf() ? 0.f : mx;
    float L = 0.f, O = 0.f;
    for (int s = 0; s < nsplit; ++s) {
        const float w = exp2f(part_lse[ph + s] - base);  // -inf (empty split) -> 0
        L += w;
        O = fmaf(w, part_o[(ph + s) * D + d], O);
    }
    return L > 0.f ? O / L : 0.f;
}
