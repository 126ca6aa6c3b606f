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

import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from worker.attention import AttentionMetadata
from worker.device_copy import host_to_device
from worker.input_batch import DeviceStep, HostInputs, StepInputs
from worker.persistent_batch import InputBuilder, _ids
from worker.scheduler import ScheduledRequest, SchedulerOutput

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
        # Diff staging (see _scatter): room for every row's fields and a few blocks each.
        self._stage_cap = 1 + 7 * rows
        pin = device.type == "cuda"
        self._stages = []
        for _ in range(2):
            host = torch.zeros((2, self._stage_cap), dtype=i32, pin_memory=pin)
            self._stages.append((host, host.numpy()))
        self._turn = 0
        self._dev_stage = torch.zeros((2, self._stage_cap), dtype=i32, device=device)
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
        self.tables: Sequence[object] = []
        self.written = np.zeros(self.rows, dtype=np.int64)  # block ids written per row
        # num_computed, num_new, kv_offset per row as the device holds them
        self.fields = np.full((3, self.rows), UNKNOWN, dtype=np.int64)
        self.num_reqs = UNKNOWN

    def forget_tables(self) -> None:
        """A host-path graph step copied its own block-table rows over the state's."""
        self.tables = [None] * len(self.order)
        self.written[:] = 0

    def apply(self, step: DeviceStep) -> None:
        """Bring the device state to `step`'s schedule (queued on the current stream).
        Per row only numpy compares and C-level maps: the Python work is per changed row,
        and a steady step costs a handful of numpy calls."""
        b, rows = len(step.ids), self.rows
        self._layout(step.ids)
        want, have = step.fields, self.fields[:, :b]  # [3, B]
        idx: list[np.ndarray] = []
        val: list[np.ndarray] = []
        diff = have != want
        if diff.any():
            field, row = np.nonzero(diff)
            idx.append(1 + field * rows + row)
            val.append(want[field, row])
            have[...] = want
        have[0] += want[1]  # what the token kernel leaves in num_computed
        tables = step.tables
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=b)
        lo = self.written[:b]
        if any(map(operator.is_not, tables, self.tables)):  # replaced tables: written whole
            replaced = np.fromiter(map(operator.is_not, tables, self.tables), bool, count=b)
            lo = np.where(replaced, 0, lo)
        grow = np.flatnonzero(lens > lo).tolist()
        if grow:  # rows with new block ids: few per step
            self._new_blocks(grow, lo, lens, tables, idx, val)
        self.written[:b] = lens
        self.tables = tables  # the step's own list (the builder makes one per step)
        if self.num_reqs != b:
            idx.append(np.zeros(1, dtype=np.int64))
            val.append(np.full(1, b))
            self.num_reqs = b
        if idx:
            self._scatter(idx, val)

    def _new_blocks(
        self,
        grow: list[int],
        lo: np.ndarray,
        lens: np.ndarray,
        tables: list[Sequence[int]],
        idx: list[np.ndarray],
        val: list[np.ndarray],
    ) -> None:
        """The diff entries of rows `grow`'s block ids lo[i]:lens[i]."""
        w, t0 = self.width, self._table0
        one_idx: list[int] = []  # a decode's new block: one id, no numpy call per row
        one_val: list[int] = []
        for i in grow:
            start, stop = int(lo[i]), int(lens[i])
            if stop - start == 1:
                one_idx.append(t0 + i * w + start)
                one_val.append(tables[i][start])
            else:
                idx.append(np.arange(t0 + i * w + start, t0 + i * w + stop))
                val.append(_ids(tables[i][start:stop]))
        if one_idx:
            idx.append(np.array(one_idx, dtype=np.int64))
            val.append(np.array(one_val, dtype=np.int64))

    def _layout(self, ids: list[str]) -> None:
        """Rows 0..B-1 become `ids`: kept rows move by one gather on the device."""
        if ids == self.order:
            return
        where = {rid: i for i, rid in enumerate(self.order)}
        src = [where.get(rid, UNKNOWN) for rid in ids]
        b = len(ids)
        moved = np.asarray(src, dtype=np.int64)
        if ((moved >= 0) & (moved != np.arange(b))).any():
            index = self._to_device(np.maximum(moved, 0))
            self.per_row[:, :b] = self.per_row.index_select(1, index)
            self.block_tables[:b] = self.block_tables.index_select(0, index)
        fresh = moved < 0
        self.tables = [self.tables[s] if s >= 0 else None for s in src]
        self.written[:b] = np.where(fresh, 0, self.written[np.maximum(moved, 0)])
        self.fields[:, :b] = np.where(fresh, UNKNOWN, self.fields[:, np.maximum(moved, 0)])
        self.order = list(ids)

    def _scatter(self, idx: list[np.ndarray], val: list[np.ndarray]) -> None:
        """One (flat index, value) scatter into the state; nothing when the diff is empty.

        Through one of two pinned staging buffers, used in turn (with async scheduling the
        next step's diff is written while this one's copy may still be queued); a diff too
        large for them (a layout of fresh long rows) goes through a pinned copy of its own.
        """
        flat_idx = np.concatenate(idx)
        n = len(flat_idx)
        values = np.concatenate(val)
        if n > self._stage_cap:
            packed = self._to_device(np.stack([flat_idx, values]).astype(np.int32))
            self.flat[packed[0]] = packed[1]
            return
        host, view = self._stages[self._turn]
        self._turn ^= 1
        view[0, :n] = flat_idx
        view[1, :n] = values
        dev = self._dev_stage[:, :n]
        dev.copy_(host[:, :n], non_blocking=True)
        self.flat[dev[0]] = dev[1]

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        return host_to_device(torch.from_numpy(a), self.device)

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
        ids = host_to_device(torch.from_numpy(host.input_ids), self.device)
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
        columns = _decode_rows(scheduled, st.width)
        if columns is None:
            return self.fallback(out)
        ids, tables, starts, offsets, tokens, sampling = columns
        b = len(scheduled)
        fields = np.empty((3, b), dtype=np.int64)  # cache start, num_new, kv_offset
        fields[2] = offsets
        np.subtract(starts, fields[2], out=fields[0])
        fields[1] = 1
        seq_lens = (fields[0] + 1).astype(np.int32)
        self.device_steps += 1
        step = DeviceStep(scheduled, ids, tables, fields)
        return HostInputs(
            input_ids=np.array(tokens, dtype=np.int64),
            positions=_EMPTY64,
            slot_mapping=_EMPTY64,
            query_start_loc=self._qsl[: b + 1],  # one token per row: what fed ids read
            seq_lens=seq_lens,
            block_tables=np.zeros((0, st.width), dtype=np.int32),
            max_query_len=1,
            max_seq_len=int(seq_lens.max()),
            sample_rows=[[i] for i in sampling],
            sample_sched_index=sampling,
            device=step,
        )


Columns = tuple[list[str], list[Sequence[int]], list[int], list[int], list[int], list[int]]


def _decode_rows(scheduled: list[ScheduledRequest], width: int) -> Columns | None:
    """(ids, tables, starts, kv offsets, input ids, sampling rows) of a step of plain
    decodes that fit the state (persistent_batch.decode_columns' rule, plus no PyramidKV
    shift and tables of at most `width` blocks); None otherwise. One pass per step."""
    ids, tables, starts, offsets, tokens, sampling = [], [], [], [], [], []
    for i, sr in enumerate(scheduled):
        req = sr.request
        if sr.num_new_tokens != 1 or sr.num_spec_tokens or req.kv_compression_pending:
            return None
        st, known, table = sr.start, req.all_token_ids, sr.block_table
        if sr.layer_shift is not None or len(table) > width:
            return None
        if req.wants_prompt_logprobs and st < req.num_prompt_tokens - 1:
            return None
        ids.append(req.request_id)
        tables.append(table)
        starts.append(st)
        offsets.append(sr.kv_offset)
        # Past the known tokens: async scheduling feeds this id from the GPU (0 here).
        tokens.append(known[st] if st < len(known) else 0)
        if st + 1 >= len(known):  # sr.samples
            sampling.append(i)
    return ids, tables, starts, offsets, tokens, sampling
