// What one decode-attention block owns, from its grid position: grid (splits, KV heads x
// query-head chunks of GQ, requests). Shared by the old decode kernels
// (paged_attention_kernels.cu) and the tensor-core one (decode_attention.cu); cuda/compiler.py
// `read_source` pastes it where it is included.

#pragma once

struct DecodeBlock {
    int split;    // this block's split of the sequence (blockIdx.x)
    int kvh;      // its KV head
    int g0;       // the first query head of its chunk, within the KV head's group
    int gcount;   // query heads in the chunk (GQ, or fewer in the group's last chunk)
    int r;        // its request
    int qs;       // the request's first query row
    int q_len;    // the request's query rows this step
    int seq_len;  // the request's tokens in the cache, this step's included
};

template <int GQ>
__device__ __forceinline__ DecodeBlock decode_block(
    int group, const int* __restrict__ query_start_loc, const int* __restrict__ seq_lens) {
    const int hc = (group + GQ - 1) / GQ;  // query-head chunks per KV head
    const int r = blockIdx.z;
    const int qs = query_start_loc[r];
    const int g0 = (blockIdx.y % hc) * GQ;
    return DecodeBlock{(int)blockIdx.x, (int)blockIdx.y / hc, g0, min(GQ, group - g0), r, qs,
                       query_start_loc[r + 1] - qs, seq_lens[r]};
}
