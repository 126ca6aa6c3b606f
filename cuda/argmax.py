"""Row argmax of fp32 logits in one launch: ids[b] = argmax(x[b, :V]), the first index of
the maximum, as torch.argmax.

torch's argmax over one 128k-vocabulary row runs in a single block (27 us per step on an
H200, BENCHMARKS.md profile); this kernel spreads a row over ~130 blocks:

    grid (ceil(V / PER_BLOCK), B), block 256. Each block folds its slice into one 64-bit
    key = ordered(value) << 32 | (0xffffffff - index), so the largest key is the largest
    value, ties going to the smallest index, and atomicMax-es it into keys[b]. The last
    block of a row to finish (a counter per row) writes the index and resets the key and
    the counter to 0, so the scratch needs no memset before the next call.

ordered() maps float bits to unsigned ints of the same order (-0 as +0; a positive NaN above
+inf, as torch ranks NaN highest). `argmax_ref` is the reference: torch.argmax.
"""

from __future__ import annotations

import numpy as np
import torch

from cuda import compiler
from cuda.step_fusion import step_fusion

BLOCK = 256
PER_BLOCK = 1024  # elements of a row per block (4 per thread)
MAX_ROWS = 65535  # grid.y

SOURCE = r"""
__device__ __forceinline__ unsigned int ordered(float f) {
    const unsigned int u = __float_as_uint(f == 0.0f ? 0.0f : f);  // -0 ties +0, as in torch
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// keys [B] u64 and counts [B] u32: zero before the first call, left zero by every call.
extern "C" __global__ void __launch_bounds__(256) argmax_rows(
    const float* __restrict__ x, long long stride, int vocab, int per_block,
    unsigned long long* __restrict__ keys, unsigned int* __restrict__ counts,
    long long* __restrict__ out) {
    const long long row = blockIdx.y;
    const int start = blockIdx.x * per_block;
    const int end = min(start + per_block, vocab);
    const float* xr = x + row * stride;
    unsigned long long best = 0ull;
    for (int i = start + threadIdx.x; i < end; i += blockDim.x) {
        const unsigned long long key =
            ((unsigned long long)ordered(xr[i]) << 32) | (0xffffffffu - (unsigned int)i);
        best = max(best, key);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
    __shared__ unsigned long long warp_best[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) warp_best[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) best = max(best, warp_best[w]);
        atomicMax(keys + row, best);
        __threadfence();  // the max is visible before the count says this block is done
        if (atomicAdd(counts + row, 1u) == gridDim.x - 1) {  // the row's last block
            const unsigned long long k = atomicExch(keys + row, 0ull);
            counts[row] = 0u;
            out[row] = (long long)(0xffffffffu - (unsigned int)(k & 0xffffffffull));
        }
    }
}
"""

_scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
# Every scratch ever handed out stays alive: a captured graph keeps its pointers.
_retired: list[tuple[torch.Tensor, torch.Tensor]] = []


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(dim=-1)


def argmax_supported(x: torch.Tensor) -> bool:
    return (
        x.dim() == 2
        and x.dtype == torch.float32
        and 1 <= x.shape[0] <= MAX_ROWS
        and 1 <= x.shape[1] < 2**31 - 1
        and x.stride(1) == 1
    )


def argmax_launch(
    x: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor, out: torch.Tensor
) -> tuple[str, tuple[int, int], int, tuple[object, ...]]:
    rows, vocab = x.shape
    args = (
        x.data_ptr(),
        np.int64(x.stride(0)),
        np.int32(vocab),
        np.int32(PER_BLOCK),
        keys.data_ptr(),
        counts.data_ptr(),
        out.data_ptr(),
    )
    return "argmax_rows", (-(-vocab // PER_BLOCK), rows), BLOCK, args


def _scratch_for(device: torch.device, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed keys / counts of at least `rows`, one pair per device (calls on one stream
    only: two streams at once would share the counters); grown outside graph capture only
    (CUDA-graph warm-ups run the largest batch first, so captures find it sized)."""
    have = _scratch.get(device)
    if have is None or have[0].shape[0] < rows:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("argmax scratch must be sized before graph capture")
        n = max(rows, 64)
        if have is not None:
            _retired.append(have)
        have = (
            torch.zeros(n, dtype=torch.int64, device=device),
            torch.zeros(n, dtype=torch.int32, device=device),
        )
        _scratch[device] = have
    return have


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """[B] int64 argmax of each row of x [B, V]: the kernel for fp32 CUDA rows, else torch."""
    if not (x.is_cuda and argmax_supported(x) and step_fusion()):
        return argmax_ref(x)
    keys, counts = _scratch_for(x.device, x.shape[0])
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    name, grid, block, args = argmax_launch(x, keys, counts, out)
    kernel = compiler.load_module(SOURCE, name="argmax").kernel(name)
    compiler.launch(kernel, grid, block, *args)
    return out
