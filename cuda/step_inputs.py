"""Step inputs computed on the GPU by Numba CUDA kernels (int32 bookkeeping).

A persistent batch keeps, per row of the batch, the request's token ids and block table on
the device; each step only says which rows run and how many tokens each computes. From that
these kernels derive the flat step inputs the model and the attention kernels read::

    per scheduled request b:  row[b] (persistent row)  num_computed[b]  num_new[b]
    query_start_loc[b + 1] = sum(num_new[:b + 1])          (one block, scanned)
    seq_lens[b]            = num_computed[b] + num_new[b]
    for token t of request b, position p = num_computed[b] + i:
        positions[t]    = p
        input_ids[t]    = token_ids[row[b], p]
        slot_mapping[t] = block_tables[row[b], p // block_size] * block_size + p % block_size
    tokens past the last request (graph padding): slot_mapping = -1 (the KV write skips it)

Work per step is O(tokens) on the GPU and O(1) launches on the CPU, whatever the batch.
`step_inputs_ref` is the numpy reference: what the tests compare the kernels with, on the
GPU and through Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) on CPU.

numba-cuda 0.30 imports `np.row_stack`, which numpy 2.5 removed: restored before importing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, no_type_check

import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack  # type: ignore[attr-defined]

from numba import config as _numba_config
from numba import cuda

# Threads per block. The CUDA simulator runs every thread as a Python thread (a 256-thread
# launch takes about a second there): it runs the same kernels with small blocks, which
# only adds trips through the loops over chunks (tests on the GPU use the real sizes).
SIMULATED = bool(getattr(_numba_config, "ENABLE_CUDASIM", 0))
SCAN_THREADS = 16 if SIMULATED else 256
TOKEN_THREADS = 2 if SIMULATED else 128


@dataclass
class StepInputArrays:
    """Outputs, preallocated at their maximum sizes (device arrays or numpy for the ref)."""

    query_start_loc: Any  # [max_reqs + 1] int32
    seq_lens: Any  # [max_reqs] int32
    positions: Any  # [max_tokens] int64
    input_ids: Any  # [max_tokens] int64
    slot_mapping: Any  # [max_tokens] int64


@cuda.jit(cache=False)
@no_type_check  # kernel bodies are Numba CUDA, not typed Python
def _scan_kernel(num_computed, num_new, num_reqs, max_reqs, query_start_loc, seq_lens):
    # One block: an inclusive scan of num_new in chunks of SCAN_THREADS, carrying the sum.
    # Requests past num_reqs (graph padding) get q_len 0 and seq_len 0.
    buf = cuda.shared.array(SCAN_THREADS, dtype=np.int32)
    tid = cuda.threadIdx.x
    carry = 0
    if tid == 0:
        query_start_loc[0] = 0
    for base in range(0, max_reqs, SCAN_THREADS):
        i = base + tid
        v = 0
        if i < num_reqs:
            v = num_new[i]
            seq_lens[i] = num_computed[i] + v
        elif i < max_reqs:
            seq_lens[i] = 0
        buf[tid] = v
        cuda.syncthreads()
        off = 1
        while off < SCAN_THREADS:
            add = buf[tid - off] if tid >= off else 0
            cuda.syncthreads()
            buf[tid] += add
            cuda.syncthreads()
            off *= 2
        if i < max_reqs:
            query_start_loc[i + 1] = carry + buf[tid]
        carry += buf[SCAN_THREADS - 1]
        cuda.syncthreads()


@cuda.jit(cache=False)
@no_type_check
def _token_kernel(
    rows,
    num_computed,
    num_reqs,
    token_ids,
    block_tables,
    block_size,
    query_start_loc,
    max_tokens,
    positions,
    input_ids,
    slot_mapping,
):
    # Block b < num_reqs fills request b's tokens; block num_reqs marks the padding tokens.
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    if b < num_reqs:
        start = query_start_loc[b]
        n = query_start_loc[b + 1] - start
        row = rows[b]
        p0 = num_computed[b]
        for i in range(tid, n, cuda.blockDim.x):
            p = p0 + i
            t = start + i
            positions[t] = p
            input_ids[t] = token_ids[row, p]
            blk = block_tables[row, p // block_size]
            slot_mapping[t] = blk * block_size + p % block_size
    else:
        for t in range(query_start_loc[num_reqs] + tid, max_tokens, cuda.blockDim.x):
            slot_mapping[t] = -1


def launch_step_inputs(
    rows: Any,  # [B] int32: persistent row of each scheduled request
    num_computed: Any,  # [B] int32
    num_new: Any,  # [B] int32
    token_ids: Any,  # [R, max_model_len] int32 (or int64)
    block_tables: Any,  # [R, max_blocks] int32
    block_size: int,
    out: StepInputArrays,
    num_reqs: int,
    stream: Any = 0,
) -> None:
    """Launch both kernels on `stream` (torch's current stream inside graph capture).

    Inputs and outputs are device arrays (torch CUDA tensors work through
    __cuda_array_interface__); the first num_reqs entries of rows / num_computed / num_new
    are read. Output sizes come from the preallocated arrays, never from this step's data,
    so a captured graph stays right when lengths change.
    """
    max_reqs = out.seq_lens.shape[0]
    max_tokens = out.slot_mapping.shape[0]
    stream = numba_stream(stream)
    _scan_kernel[1, SCAN_THREADS, stream](
        num_computed, num_new, num_reqs, max_reqs, out.query_start_loc, out.seq_lens
    )
    _token_kernel[num_reqs + 1, TOKEN_THREADS, stream](
        rows,
        num_computed,
        num_reqs,
        token_ids,
        block_tables,
        block_size,
        out.query_start_loc,
        max_tokens,
        out.positions,
        out.input_ids,
        out.slot_mapping,
    )


# ---- the engine's kernels: state kept in the persistent batch's rows (worker/device_inputs.py)
#
# Row b of the state is the step's request b (the persistent batch keeps its rows in
# schedule order), so no row index is read. The number of requests is read from the
# device (`header[0]`), not passed at launch: a captured decode graph of `max_reqs` rows
# then serves every step of up to max_reqs requests. The token kernel also advances
# `num_computed` by the tokens it laid out, so a steady decode step sends nothing:
#
#     per row b < header[0]:  c0 = num_computed[b]  n = num_new[b]  off = kv_offset[b]
#     seq_lens[b] = c0 + n;  for i < n, c = c0 + i (cache index), t = query_start_loc[b] + i:
#         positions[t] = c + off        slot_mapping[t] = block_tables[b, c // bs] * bs + c % bs
#     then num_computed[b] = c0 + n
#     rows past header[0]: seq_len 0, query length 0;  tokens past the last row: slot -1


@cuda.jit(cache=False)
@no_type_check
def _row_scan_kernel(header, num_computed, num_new, max_reqs, query_start_loc, seq_lens):
    # _scan_kernel's scan (a device function holding the shared buffer would not compile
    # for a target without a device: tests/test_device_inputs.py compiles these for sm_90).
    num_reqs = header[0]
    buf = cuda.shared.array(SCAN_THREADS, dtype=np.int32)
    tid = cuda.threadIdx.x
    carry = 0
    if tid == 0:
        query_start_loc[0] = 0
    for base in range(0, max_reqs, SCAN_THREADS):
        i = base + tid
        v = 0
        if i < num_reqs:
            v = num_new[i]
            seq_lens[i] = num_computed[i] + v
        elif i < max_reqs:
            seq_lens[i] = 0
        buf[tid] = v
        cuda.syncthreads()
        off = 1
        while off < SCAN_THREADS:
            add = buf[tid - off] if tid >= off else 0
            cuda.syncthreads()
            buf[tid] += add
            cuda.syncthreads()
            off *= 2
        if i < max_reqs:
            query_start_loc[i + 1] = carry + buf[tid]
        carry += buf[SCAN_THREADS - 1]
        cuda.syncthreads()


@cuda.jit(cache=False)
@no_type_check
def _row_token_kernel(
    header,
    num_computed,
    kv_offset,
    block_tables,
    block_size,
    query_start_loc,
    max_tokens,
    positions,
    slot_mapping,
):
    # Block b < header[0] lays out row b's tokens; block header[0] marks the padding.
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    num_reqs = header[0]
    if b < num_reqs:
        start = query_start_loc[b]
        n = query_start_loc[b + 1] - start
        c0 = num_computed[b]
        off = kv_offset[b]
        for i in range(tid, n, cuda.blockDim.x):
            c = c0 + i
            positions[start + i] = c + off
            blk = block_tables[b, c // block_size]
            slot_mapping[start + i] = blk * block_size + c % block_size
        cuda.syncthreads()  # every thread has read num_computed[b] before it moves
        if tid == 0:
            num_computed[b] = c0 + n
    elif b == num_reqs:
        for t in range(query_start_loc[num_reqs] + tid, max_tokens, cuda.blockDim.x):
            slot_mapping[t] = -1


@dataclass
class RowState:
    """The persistent batch's int32 state the engine's kernels read (device arrays)."""

    header: Any  # [1]: the step's number of requests
    num_computed: Any  # [R]: cache index of each row's first new token (advanced by a step)
    num_new: Any  # [R]: tokens each row computes this step
    kv_offset: Any  # [R]: position - cache index (KV compression), 0 otherwise
    block_tables: Any  # [R, max_blocks]


def launch_row_step_inputs(
    state: RowState, block_size: int, out: StepInputArrays, max_reqs: int, stream: Any = 0
) -> None:
    """positions, slot_mapping, query_start_loc and seq_lens of the step `state` holds
    (out.input_ids is not written: the ids come from the host or the sampled tokens).

    Grid and loop bounds come from `max_reqs` (a graph's batch bucket, >= header[0]) and
    the output sizes, never from the step, so a captured graph replays any step that fits.
    """
    max_tokens = out.slot_mapping.shape[0]
    stream = numba_stream(stream)
    _row_scan_kernel[1, SCAN_THREADS, stream](
        state.header, state.num_computed, state.num_new, max_reqs, out.query_start_loc, out.seq_lens
    )
    _row_token_kernel[max_reqs + 1, TOKEN_THREADS, stream](
        state.header,
        state.num_computed,
        state.kv_offset,
        state.block_tables,
        block_size,
        out.query_start_loc,
        max_tokens,
        out.positions,
        out.slot_mapping,
    )


def row_step_inputs_ref(
    state: RowState, block_size: int, max_reqs: int, max_tokens: int
) -> tuple[StepInputArrays, np.ndarray]:
    """launch_row_step_inputs in numpy (numpy state, not modified): the outputs (input_ids
    zeros) and num_computed after the step."""
    b = int(state.header[0])
    c0 = np.asarray(state.num_computed[:b], dtype=np.int64)
    n = np.asarray(state.num_new[:b], dtype=np.int64)
    qsl = np.zeros(max_reqs + 1, dtype=np.int32)
    qsl[1 : b + 1] = np.cumsum(n)
    qsl[b + 1 :] = qsl[b]
    seq_lens = np.zeros(max_reqs, dtype=np.int32)
    seq_lens[:b] = c0 + n
    positions = np.zeros(max_tokens, dtype=np.int64)
    slots = np.full(max_tokens, -1, dtype=np.int64)
    for r in range(b):
        c = np.arange(c0[r], c0[r] + n[r], dtype=np.int64)
        t = slice(int(qsl[r]), int(qsl[r + 1]))
        positions[t] = c + int(state.kv_offset[r])
        slots[t] = state.block_tables[r, c // block_size].astype(np.int64) * block_size + (
            c % block_size
        )
    computed = np.array(state.num_computed, dtype=np.int32)
    computed[:b] = c0 + n
    return StepInputArrays(
        qsl, seq_lens, positions, np.zeros(max_tokens, np.int64), slots
    ), computed


def step_inputs_ref(
    rows: np.ndarray,
    num_computed: np.ndarray,
    num_new: np.ndarray,
    token_ids: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    max_reqs: int,
    max_tokens: int,
) -> StepInputArrays:
    """The numpy reference of launch_step_inputs (positions etc. of unused rows left 0)."""
    b = len(rows)
    qsl = np.zeros(max_reqs + 1, dtype=np.int32)
    qsl[1 : b + 1] = np.cumsum(num_new)
    qsl[b + 1 :] = qsl[b]
    seq_lens = np.zeros(max_reqs, dtype=np.int32)
    seq_lens[:b] = num_computed + num_new
    positions = np.zeros(max_tokens, dtype=np.int64)
    input_ids = np.zeros(max_tokens, dtype=np.int64)
    slots = np.full(max_tokens, -1, dtype=np.int64)
    for r in range(b):
        p = np.arange(num_computed[r], num_computed[r] + num_new[r], dtype=np.int64)
        t = slice(int(qsl[r]), int(qsl[r + 1]))
        positions[t] = p
        input_ids[t] = token_ids[rows[r], p]
        slots[t] = block_tables[rows[r], p // block_size].astype(np.int64) * block_size + (
            p % block_size
        )
    return StepInputArrays(qsl, seq_lens, positions, input_ids, slots)


_streams: dict[int, Any] = {}


def numba_stream(stream: Any) -> Any:
    """A raw CUstream handle (torch's `.cuda_stream`) as a Numba stream, made once per handle."""
    if not isinstance(stream, int) or stream == 0:
        return stream
    wrapped = _streams.get(stream)
    if wrapped is None:
        wrapped = _streams[stream] = cuda.external_stream(stream)
    return wrapped


def as_numba(x: Any) -> Any:
    """A device array Numba launches without re-reading __cuda_array_interface__.

    Converting a torch tensor costs tens of microseconds per argument and launch; buffers
    that live as long as the batch are converted once (numpy arrays pass through: CPU sim).
    """
    return cuda.as_cuda_array(x) if hasattr(x, "__cuda_array_interface__") else x


def bind_outputs(out: StepInputArrays) -> StepInputArrays:
    """`out` with every array converted by as_numba (keep the torch tensors for reading)."""
    return StepInputArrays(**{f.name: as_numba(getattr(out, f.name)) for f in fields(out)})
