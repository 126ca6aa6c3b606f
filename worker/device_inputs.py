"""Step inputs on the device (HEADRACE_STEP_INPUTS=numba): the persistent batch's int32
state lives in device tensors, updated by diffs, and the Numba kernels of
cuda/step_inputs.py compute each decode step's positions, slot mapping, query starts and
seq_lens from it, on torch's current stream (inside the decode CUDA graphs when they run).

One int32 device tensor holds the whole state, row b being the step's request b (rows
follow the schedule's order, as in worker/persistent_batch.py)::

    flat = [ num_reqs | num_computed[R] | num_new[R] | kv_offset[R] | block_tables[R, W] ]

    num_computed[b]  cache index of row b's first new token; the token kernel adds num_new[b]
                     once it has laid the row out, so the next decode step finds it right
    block_tables     the decode graphs' block-table input itself (no copy per step)

What the host sends per step is the diff between the schedule and its mirror of that state:

    steady decode (same requests, same order, no new block)    nothing
    a row crosses a block boundary                             its new block id
    requests arrived, finished, moved                          one gather of the kept rows
                                                               on the device, fresh rows whole
    a row preempted, recomputed, compacted                     its changed fields

all as one (flat index, value) scatter, through pinned memory. The host never reads back
what the device computed: the lengths it still needs (seq_lens' max, the rows that sample)
come from the schedule. Steps other than plain decodes (prefill chunks, speculation,
prompt logprobs, PyramidKV, tensor parallel) keep the host builder; a CUDA graph step of
the host path writes block-table rows itself, after which the mirror forgets them.

On CPU the same code runs through Numba's CUDA simulator on numpy views of the CPU tensors
(eager steps: the CPU has no graphs), which is how tests/test_device_inputs.py runs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from worker.attention import AttentionMetadata
from worker.input_batch import DeviceStep, HostInputs, StepInputs
from worker.persistent_batch import InputBuilder, _ids, decode_columns
from worker.scheduler import SchedulerOutput

ENV = "HEADRACE_STEP_INPUTS"
MODES = ("host", "numba")
UNKNOWN = -1  # a mirrored field the device may not hold: written at the next step

_EMPTY64 = np.zeros(0, dtype=np.int64)


def step_inputs_mode() -> str:
    mode = os.environ.get(ENV) or "host"
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def kernels(device: torch.device) -> Any:
    """cuda.step_inputs, through the CUDA simulator on CPU (set before numba is imported)."""
    if device.type == "cpu":
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    from numba import config

    import cuda.step_inputs as si

    if device.type == "cpu" and not getattr(config, "ENABLE_CUDASIM", 0):
        raise RuntimeError(f"{ENV}=numba on CPU needs numba imported with NUMBA_ENABLE_CUDASIM=1")
    return si


class DeviceStepState:
    """The state above, its host mirror, and the kernels' launches (see the module doc)."""

    def __init__(self, rows: int, width: int, block_size: int, device: torch.device) -> None:
        self.rows, self.width, self.block_size, self.device = rows, width, block_size, device
        self.si = kernels(device)
        i32, i64 = torch.int32, torch.int64
        self.flat = torch.zeros(1 + 3 * rows + rows * width, dtype=i32, device=device)
        self.header = self.flat[:1]
        self.per_row = self.flat[1 : 1 + 3 * rows].view(3, rows)
        self.block_tables = self.flat[1 + 3 * rows :].view(rows, width)
        self._table0 = 1 + 3 * rows  # flat index of block_tables[0, 0]
        # Eager steps' outputs (a graph writes its own buffers): decode, one token per row.
        self.query_start_loc = torch.zeros(rows + 1, dtype=i32, device=device)
        self.seq_lens = torch.zeros(rows, dtype=i32, device=device)
        self.positions = torch.zeros(rows, dtype=i64, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=i64, device=device)
        # The kernels' views, made once: converting a tensor costs tens of us per launch.
        nb = self._numba
        self.nb_state = self.si.RowState(
            nb(self.header), *(nb(x) for x in self.per_row), nb(self.block_tables)
        )
        self.nb_out = [nb(x) for x in self._eager_buffers()]
        self.forget()
        self.launches = 0  # eager launches (tests: the device path ran)

    def _eager_buffers(self) -> list[torch.Tensor]:
        return [self.query_start_loc, self.seq_lens, self.positions, self.slot_mapping]

    def _numba(self, t: torch.Tensor) -> Any:
        return t.numpy() if t.device.type == "cpu" else self.si.as_numba(t)

    # ---- the mirror ------------------------------------------------------------------------
    def forget(self) -> None:
        """The device's rows are unknown (after graph capture): the next step writes all."""
        self.order: list[str] = []
        self.tables: list[object] = []
        self.written: list[int] = []
        self.fields: list[list[int]] = [[], [], []]  # num_computed, num_new, kv_offset
        self.num_reqs = UNKNOWN

    def forget_tables(self) -> None:
        """A host-path graph step copied its own block-table rows over the state's."""
        self.tables = [None] * len(self.order)
        self.written = [0] * len(self.order)

    def apply(self, step: DeviceStep) -> None:
        """Bring the device state to `step`'s schedule (queued on the current stream)."""
        scheduled = step.scheduled
        self._layout([sr.request.request_id for sr in scheduled])
        rows, w, t0 = self.rows, self.width, self._table0
        idx: list[int] = []
        val: list[int] = []
        chunks: list[tuple[np.ndarray, np.ndarray]] = []
        computed, num_new, kv_offset = self.fields
        for i, sr in enumerate(scheduled):
            off, n = sr.kv_offset, sr.num_new_tokens
            c0 = sr.start - off
            if computed[i] != c0:
                idx.append(1 + i)
                val.append(c0)
            if num_new[i] != n:
                idx.append(1 + rows + i)
                val.append(n)
                num_new[i] = n
            if kv_offset[i] != off:
                idx.append(1 + 2 * rows + i)
                val.append(off)
                kv_offset[i] = off
            computed[i] = c0 + n  # what the token kernel leaves there
            table, lo = sr.block_table, self.written[i]
            if table is not self.tables[i]:
                self.tables[i], lo = table, 0  # replaced (preempted, compacted): whole row
            hi = len(table)
            if hi > lo:
                base = t0 + i * w
                chunks.append((np.arange(base + lo, base + hi), _ids(table[lo:hi])))
            self.written[i] = hi
        if self.num_reqs != len(scheduled):
            idx.append(0)
            val.append(len(scheduled))
            self.num_reqs = len(scheduled)
        self._scatter(idx, val, chunks)

    def _layout(self, ids: list[str]) -> None:
        """Rows 0..B-1 become `ids`: kept rows move by one gather on the device."""
        if ids == self.order:
            return
        where = {rid: i for i, rid in enumerate(self.order)}
        src = [where.get(rid, UNKNOWN) for rid in ids]
        b = len(ids)
        if any(s >= 0 and s != i for i, s in enumerate(src)):
            index = self._to_device(np.maximum(np.asarray(src, dtype=np.int64), 0))
            self.per_row[:, :b] = self.per_row.index_select(1, index)
            self.block_tables[:b] = self.block_tables.index_select(0, index)
        self.tables = [self.tables[s] if s >= 0 else None for s in src]
        self.written = [self.written[s] if s >= 0 else 0 for s in src]
        self.fields = [[f[s] if s >= 0 else UNKNOWN for s in src] for f in self.fields]
        self.order = list(ids)

    def _scatter(
        self, idx: list[int], val: list[int], chunks: list[tuple[np.ndarray, np.ndarray]]
    ) -> None:
        if not idx and not chunks:
            return
        flat_idx = np.concatenate([np.asarray(idx, dtype=np.int64), *(c[0] for c in chunks)])
        values = np.concatenate([np.asarray(val, dtype=np.int64), *(c[1] for c in chunks)])
        packed = self._to_device(np.stack([flat_idx, values]))
        self.flat.index_copy_(0, packed[0], packed[1].to(torch.int32))

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # ---- launches --------------------------------------------------------------------------
    def launch(self, out: Any, max_reqs: int) -> None:
        """The kernels on torch's current stream; `out` a cuda.step_inputs.StepInputArrays
        of tensors (converted here: at capture) or of numba arrays."""
        stream = (
            torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        )
        self.si.launch_row_step_inputs(self.nb_state, self.block_size, out, max_reqs, stream)

    def graph_outputs(
        self,
        qsl: torch.Tensor,
        seq_lens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
    ) -> Any:
        """A CUDA graph's input buffers as the kernels' outputs (converted once, at capture)."""
        nb = self._numba
        return self.si.StepInputArrays(
            nb(qsl), nb(seq_lens), nb(positions), nb(positions), nb(slots)
        )

    def prepare_capture(self, num_reqs: int, q: int) -> None:
        """Capture-time state (outside the capture): num_reqs rows of q tokens from cache
        index 0 in block 0, as the host path's capture inputs."""
        self.header.fill_(num_reqs)
        self.per_row.zero_()
        self.per_row[1].fill_(q)
        self.block_tables.zero_()
        self.forget()

    def eager_inputs(self, host: HostInputs) -> StepInputs:
        """A device-built step run eagerly: its ids from the host, the rest from the kernels."""
        assert host.device is not None
        self.apply(host.device)
        b = len(host.seq_lens)
        qsl, seq, pos, slots = self.nb_out
        out = self.si.StepInputArrays(qsl[: b + 1], seq[:b], pos[:b], pos[:b], slots[:b])
        self.launch(out, b)
        self.launches += 1
        md = AttentionMetadata(
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            slot_mapping=self.slot_mapping[:b],
            max_query_len=1,
            max_seq_len=host.max_seq_len,
        )
        ids = torch.from_numpy(host.input_ids)
        if self.device.type == "cuda":
            ids = ids.pin_memory().to(self.device, non_blocking=True)
        return StepInputs(ids, self.positions[:b], md, host)


class DeviceInputBatch:
    """The step-input builder of HEADRACE_STEP_INPUTS=numba: plain decode steps that fit the
    state become device-built HostInputs; every other step goes to `fallback`."""

    def __init__(
        self, state: DeviceStepState, fallback: InputBuilder, allowed: Callable[[], bool]
    ) -> None:
        self.state = state
        self.fallback = fallback
        self.allowed = allowed  # e.g. not under tensor parallel (followers take host arrays)
        self._qsl = np.arange(state.rows + 1, dtype=np.int32)
        self.device_steps = 0

    def build(self, out: SchedulerOutput) -> HostInputs:
        scheduled = out.scheduled
        st = self.state
        if not scheduled or len(scheduled) > st.rows or not self.allowed():
            return self.fallback(out)
        if any(sr.layer_shift is not None or len(sr.block_table) > st.width for sr in scheduled):
            return self.fallback(out)
        columns = decode_columns(scheduled)
        if columns is None:
            return self.fallback(out)
        starts, offsets, ids, sampling = columns
        b = len(scheduled)
        seq_lens = np.array(starts, dtype=np.int32) - np.array(offsets, dtype=np.int32) + 1
        self.device_steps += 1
        return HostInputs(
            input_ids=np.array(ids, dtype=np.int64),
            positions=_EMPTY64,
            slot_mapping=_EMPTY64,
            query_start_loc=self._qsl[: b + 1],  # one token per row: what fed ids read
            seq_lens=seq_lens,
            block_tables=np.zeros((0, st.width), dtype=np.int32),
            max_query_len=1,
            max_seq_len=int(seq_lens.max()),
            sample_rows=[[i] for i in sampling],
            sample_sched_index=sampling,
            device=DeviceStep(scheduled),
        )
