"""A persistent input batch: block tables kept row by row across steps, updated by diffs.

`build_host_inputs` (worker/input_batch.py) rebuilds every row of every step: each
request's tokens, positions and slots through Python lists, then its block table copied
row by row into a fresh array. Here the rows outlive the step (as vLLM v1's InputBatch):

    rows       0 .. B-1 are the step's requests in schedule order (what HostInputs needs)
    bt         [rows, blocks] int32: row i holds its request's block ids, zeros after them
    tables[i]  the block-table object row i was written from, written[i] how many ids

    a step whose requests are the last step's, in the same order:  only new block ids are
    written (a table grows by appending; a preempted or compacted request gets a new table
    object, so `is` tells a replaced table from a grown one, which is rewritten whole)
    requests arrived, finished or moved:  one gather moves the kept rows to their new
    places (fresh rows start at zeros)

Then a step of plain decodes (one token each, the common large-batch step) computes ids,
positions, slots, seq_lens and query starts for the whole batch in a few numpy operations
(the numpy twin of cuda/step_inputs.py's kernels); other steps go through build_host_inputs
with the kept block tables. Both give exactly build_host_inputs' arrays (tests/
test_persistent_batch.py checks it over randomized schedules). HEADRACE_INPUT_BATCH=rebuild
selects the old builder (`make_input_builder`).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Sequence

import numpy as np

from worker.input_batch import HostInputs, add_layer_inputs, build_host_inputs
from worker.scheduler import ScheduledRequest, SchedulerOutput

ENV = "HEADRACE_INPUT_BATCH"
MODES = ("persistent", "rebuild")
SMALL_BATCH = 8  # steps of fewer requests are rebuilt (measured: the rebuild is cheaper)

InputBuilder = Callable[[SchedulerOutput], HostInputs]


def make_input_builder(mode: str | None = None) -> InputBuilder:
    """The step-input builder $HEADRACE_INPUT_BATCH names (default persistent)."""
    mode = mode or os.environ.get(ENV) or "persistent"
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "rebuild":
        return build_host_inputs
    return PersistentInputBatch().build


class PersistentInputBatch:
    def __init__(self, small_batch: int = SMALL_BATCH) -> None:
        self.small_batch = small_batch  # steps of fewer requests are simply rebuilt
        self.order: list[str] = []  # request id of each row
        self.tables: list[Sequence[int] | None] = []
        self.written: list[int] = []
        self.bt = np.zeros((0, 0), dtype=np.int32)

    def build(self, out: SchedulerOutput) -> HostInputs:
        scheduled = out.scheduled
        if len(scheduled) < self.small_batch:
            # A few rows: rebuilding them costs less than the numpy calls that update them.
            # The kept rows stay right: the next large step finds what changed by itself.
            return build_host_inputs(out)
        self._layout([sr.request.request_id for sr in scheduled])
        self._write_tables(scheduled)
        b = len(scheduled)
        width = max(self.written, default=0) or 1  # pack_block_tables' shape: [B, longest]
        if width > self.bt.shape[1]:
            self._grow(b, width)
        tables = self.bt[:b, :width].copy()  # the step keeps its own: rows change next step
        columns = decode_columns(scheduled)
        if columns is not None:
            host = _decode_inputs(out, tables, columns)
            add_layer_inputs(host, out)
            return host
        return build_host_inputs(out, tables)

    # ---- rows ------------------------------------------------------------------------------
    def _layout(self, ids: list[str]) -> None:
        """Rows 0..B-1 become `ids` in order; kept rows move with one gather."""
        if ids == self.order:
            return
        where = {rid: i for i, rid in enumerate(self.order)}
        src = [where.get(rid, -1) for rid in ids]
        new = np.zeros((max(len(ids), self.bt.shape[0]), self.bt.shape[1]), dtype=np.int32)
        kept = [i for i, s in enumerate(src) if s >= 0]
        if kept:
            new[kept] = self.bt[[src[i] for i in kept]]
        self.bt = new
        self.tables = [self.tables[s] if s >= 0 else None for s in src]
        self.written = [self.written[s] if s >= 0 else 0 for s in src]
        self.order = list(ids)

    def _grow(self, rows: int, width: int) -> None:
        cap = max(width, 2 * self.bt.shape[1], 16)
        new = np.zeros((max(rows, self.bt.shape[0]), cap), dtype=np.int32)
        new[: self.bt.shape[0], : self.bt.shape[1]] = self.bt
        self.bt = new

    def _write_tables(self, scheduled: list[ScheduledRequest]) -> None:
        """Each row's new block ids (the diff), or the whole table if it was replaced."""
        for i, sr in enumerate(scheduled):
            t, w = sr.block_table, self.written[i]
            n = len(t)
            if t is self.tables[i]:
                if n == w:
                    continue  # the usual decode step: no new block
                lo = w
            else:
                lo = 0
                self.tables[i] = t
            if n > self.bt.shape[1]:
                self._grow(len(scheduled), n)
            self.bt[i, lo:n] = _ids(t[lo:n])  # a slice: no buffer export on the live table
            if n < w:
                self.bt[i, n:w] = 0  # a shorter replacement (compaction): zeros after it
            self.written[i] = n


def _ids(t: Sequence[int]) -> np.ndarray:
    """A block table as int32 without a per-element conversion (KV tables are array('i'))."""
    if isinstance(t, array) and t.itemsize == 4:
        return np.frombuffer(t, dtype=np.int32) if len(t) else np.zeros(0, dtype=np.int32)
    return np.asarray(t, dtype=np.int32)


def decode_columns(
    scheduled: list[ScheduledRequest],
) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(starts, kv offsets, input ids, sampling rows) when every request computes one
    token, without proposals, prompt logprobs to score or a KV-compression window to
    capture; None otherwise. One pass: this runs for every request of every step."""
    starts, offsets, ids, sampling = [], [], [], []
    for i, sr in enumerate(scheduled):
        req = sr.request
        if sr.num_new_tokens != 1 or sr.num_spec_tokens or req.kv_compression_pending:
            return None
        st, tokens = sr.start, req.all_token_ids
        if req.wants_prompt_logprobs and st < req.num_prompt_tokens - 1:
            return None
        starts.append(st)
        offsets.append(sr.kv_offset)
        # Past the known tokens: async scheduling feeds this id from the GPU (0 here).
        ids.append(tokens[st] if st < len(tokens) else 0)
        if st + 1 >= len(tokens):  # sr.samples
            sampling.append(i)
    return starts, offsets, ids, sampling


def _decode_inputs(
    out: SchedulerOutput,
    tables: np.ndarray,
    columns: tuple[list[int], list[int], list[int], list[int]],
) -> HostInputs:
    """build_host_inputs' arrays for a step of one token per request, vectorized:

    row b = request b;  position p = start[b];  cache index c = p - kv_offset[b]
    slot = tables[b, c // block_size] * block_size + c % block_size;  seq_len = c + 1
    """
    starts, offsets, ids, sampling = columns
    bs, b = out.block_size, len(starts)
    start = np.array(starts, dtype=np.int64)
    c = start - np.array(offsets, dtype=np.int64)
    slots = tables[np.arange(b), c // bs].astype(np.int64) * bs + c % bs
    seq_lens = (c + 1).astype(np.int32)
    return HostInputs(
        input_ids=np.array(ids, dtype=np.int64),
        positions=start,
        slot_mapping=slots,
        query_start_loc=np.arange(b + 1, dtype=np.int32),
        seq_lens=seq_lens,
        block_tables=tables,
        max_query_len=1,
        max_seq_len=int(seq_lens.max()),
        sample_rows=[[i] for i in sampling],
        sample_sched_index=sampling,
    )
