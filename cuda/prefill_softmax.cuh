// The prefill kernel's online softmax, round 1's and v2's (cuda/prefill_attention.cu pastes
// this file inside its namespace pf, after pf::D and prefill_mma.cuh).

// RESCALE_LOG2: how far (log2 units) a row's scores may pass its running max before V2
// rescales O and l (the exponentials stay <= 2^RESCALE_LOG2 = 256: exact enough in fp32 sums
// and in the bf16/fp16 P operand, whose relative precision does not depend on magnitude).
constexpr float RESCALE_LOG2 = 8.f;

// V2's online softmax over one S tile (raw scores in, P out; FlashAttention-4's lazy
// rescaling): a row keeps its running max until a tile's max passes it by more than
// RESCALE_LOG2, and O and the row sums are rescaled only when some row of the warp moved its
// max, a warp-uniform branch that after a row's first tiles is rarely taken. Round 1 rescaled
// all of O every tile (D / 4 FMULs per row-half per thread, ~11% of the loop's instructions).
// The row sums are not added here: P V's mma adds them (lacc, P times a ones column).
// softmax_rescale does the max and the rescaling, softmax_exp(_slices) the exponentials.
// Max of a row half's scores in n-tiles [0, N) of one mma row tile: a tree, not a chain
// (fmax has a fixed latency; the tree is log2 N deep).
template <int N>
__device__ __forceinline__ float row_max(const float (*s)[4], int hh) {
    if constexpr (N == 1) {
        return fmaxf(s[0][hh * 2], s[0][hh * 2 + 1]);
    } else {
        return fmaxf(row_max<N / 2>(s, hh), row_max<N - N / 2>(s + N / 2, hh));
    }
}

template <int MT, int BN>
__device__ __forceinline__ void softmax_rescale(float (&s)[MT][BN / 8][4], float (&m_run)[MT][2],
                                                float (&lacc)[MT][4], float (&o)[MT][D / 8][4],
                                                float scale_log2) {
    float mx[MT][2];
    bool moved = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float m = row_max<BN / 8>(s[mt], hh);
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
            mx[mt][hh] = m * scale_log2;
            // -inf + 8 = -inf: a row's first visible score always moves it
            moved |= mx[mt][hh] > m_run[mt][hh] + RESCALE_LOG2;
        }
    }
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const bool move = mx[mt][hh] > m_run[mt][hh] + RESCALE_LOG2;
                // exp2(-inf - finite) = +0: a row's first visible tile zeroes nothing it had
                const float corr = move ? exp2_approx(m_run[mt][hh] - mx[mt][hh]) : 1.f;
                m_run[mt][hh] = move ? mx[mt][hh] : m_run[mt][hh];
                lacc[mt][hh * 2] *= corr;
                lacc[mt][hh * 2 + 1] *= corr;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    o[mt][dt][hh * 2] *= corr;
                    o[mt][dt][hh * 2 + 1] *= corr;
                }
            }
        }
    }
}

// P = exp2(S * scale_log2 - base) for the n-tiles [LO, HI) of S, in place.
template <int MT, int BN, int LO, int HI>
__device__ __forceinline__ void softmax_exp(float (&s)[MT][BN / 8][4], const float (&base)[MT][2],
                                            float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = LO; nt < HI; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e)
                s[mt][nt][e] = exp2_approx(fmaf(s[mt][nt][e], scale_log2, -base[mt][e >> 1]));
        }
    }
}

// V2's online softmax, then P: softmax_rescale, then the exponentials in K_STEPS slices with
// between(i) called before slice i (the pipelined loop issues k-step i of the next tile's
// S = Q K^T there, so the tensor cores work through the softmax; otherwise a no-op).
template <int MT, int BN, int K_STEPS, int I = 0, typename F>
__device__ __forceinline__ void softmax_exp_slices(float (&s)[MT][BN / 8][4],
                                                   const float (&base)[MT][2], float scale_log2,
                                                   F&& between) {
    if constexpr (I < K_STEPS) {
        between(I);
        softmax_exp<MT, BN, I * (BN / 8) / K_STEPS, (I + 1) * (BN / 8) / K_STEPS>(s, base,
                                                                                   scale_log2);
        softmax_exp_slices<MT, BN, K_STEPS, I + 1>(s, base, scale_log2, between);
    }
}

// Round 1's online softmax over one S tile (raw scores in, P out): O and the lane's partial
// row sums rescaled on every tile.
template <int MT, int BN>
__device__ __forceinline__ void softmax_r1(float (&s)[MT][BN / 8][4], float (&m_run)[MT][2],
                                           float (&l_run)[MT][2], float (&o)[MT][D / 8][4],
                                           float scale_log2) {
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
}
