"""Flattening one scheduled step into model inputs (no padding).

    scheduled:   A: prefill chunk, tokens 0..5      B: decode at position 9
    input_ids:   [a0 a1 a2 a3 a4 a5 | b9]
    positions:   [ 0  1  2  3  4  5 |  9]
    query_start: [0, 6, 7]           seq_lens: [6, 10]
    slot_mapping: block_table[p // block_size] * block_size + p % block_size, per token

Built on the host (numpy) first; then either copied to fresh device tensors (eager steps)
or into the static buffers of a CUDA graph (worker/cuda_graphs.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cuda.prefill_tiles import TileSpec, build_tile_map
from worker import decode_split
from worker.attention import AttentionMetadata, QueryCapture
from worker.device_copy import host_to_device
from worker.kv_compression import layer_inputs, window_positions
from worker.scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class PromptLogprobsJob:
    sched_index: int  # which scheduled request
    rows: list[int]  # rows of the flat batch whose logits predict the next prompt token
    targets: list[int]  # the prompt tokens those rows predict


@dataclass
class DeviceStep:
    """A decode step whose positions, slot mapping, seq_lens, query starts and block tables
    are computed on the device (HEADRACE_STEP_INPUTS=numba, worker/device_inputs.py): the
    schedule the device state is updated from when the step runs. Its HostInputs then
    hold no positions or slots (empty) and no block table rows ([0, width])."""

    scheduled: list[ScheduledRequest]
    ids: list[str]  # request id of each row
    tables: list[Sequence[int]]  # each row's block table
    # [3, B] int64: per row the cache index of its first new token, its number of new
    # tokens, and its position - cache index (KV compression)
    fields: np.ndarray


@dataclass
class HostInputs:
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B + 1] int32
    seq_lens: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    # For each scheduled request that samples: its rows (1, or 1 + k with speculation).
    sample_rows: list[list[int]]
    sample_sched_index: list[int]
    prompt_logprobs: list[PromptLogprobsJob] = field(default_factory=list)
    # KV compression: rows whose queries to keep (the observation windows) and, per
    # scheduled request that has some, (sched index, first position, rows) in row order.
    capture_rows: list[int] = field(default_factory=list)
    capture_jobs: list[tuple[int, int, int]] = field(default_factory=list)
    # PyramidKV requests in the step: per-layer seq_lens [L, B] and slot_mapping [L, T].
    layer_seq_lens: np.ndarray | None = None
    layer_slot_mapping: np.ndarray | None = None
    device: DeviceStep | None = None  # the device computes the arrays above (see DeviceStep)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    md: AttentionMetadata
    host: HostInputs


@dataclass
class HostBatch:
    """A step's inputs as Python lists while they are built, one request at a time."""

    block_size: int
    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    qsl: list[int] = field(default_factory=lambda: [0])
    seq_lens: list[int] = field(default_factory=list)
    tables: list[Sequence[int]] = field(default_factory=list)
    max_query_len: int = 0
    sample_rows: list[list[int]] = field(default_factory=list)
    sample_sched_index: list[int] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobsJob] = field(default_factory=list)
    capture_rows: list[int] = field(default_factory=list)
    capture_jobs: list[tuple[int, int, int]] = field(default_factory=list)

    def add(
        self, token_ids: Sequence[int], start: int, table: Sequence[int], kv_offset: int = 0
    ) -> int:
        """One request's tokens at positions start, start + 1, ...; returns its first row.

        They go to cache indices start - kv_offset, ... (a compressed cache holds fewer
        tokens than the positions before it: rotary takes the position, the slot the index).
        """
        bs, n = self.block_size, len(token_ids)
        row0 = self.qsl[-1]
        self.ids.extend(token_ids)
        c = start - kv_offset
        if n == 1:  # decode: skip numpy for the common case
            self.pos.append(start)
            self.slots.append(table[c // bs] * bs + c % bs)
        else:
            p = np.arange(c, c + n, dtype=np.int64)
            self.pos.extend(range(start, start + n))
            self.slots.extend((np.asarray(table, dtype=np.int64)[p // bs] * bs + p % bs).tolist())
        self.qsl.append(row0 + n)
        self.seq_lens.append(c + n)
        self.tables.append(table)
        self.max_query_len = max(self.max_query_len, n)
        return row0

    def finish(self, block_tables: np.ndarray | None = None) -> HostInputs:
        """The step's arrays; `block_tables` [B, longest] when the caller keeps them already
        (worker/persistent_batch.py), else packed from each request's table."""
        return HostInputs(
            input_ids=np.asarray(self.ids, dtype=np.int64),
            positions=np.asarray(self.pos, dtype=np.int64),
            slot_mapping=np.asarray(self.slots, dtype=np.int64),
            query_start_loc=np.asarray(self.qsl, dtype=np.int32),
            seq_lens=np.asarray(self.seq_lens, dtype=np.int32),
            block_tables=pack_block_tables(self.tables) if block_tables is None else block_tables,
            max_query_len=self.max_query_len,
            max_seq_len=max(self.seq_lens, default=0),
            sample_rows=self.sample_rows,
            sample_sched_index=self.sample_sched_index,
            prompt_logprobs=self.prompt_logprobs,
            capture_rows=self.capture_rows,
            capture_jobs=self.capture_jobs,
        )


def build_host_inputs(out: SchedulerOutput, block_tables: np.ndarray | None = None) -> HostInputs:
    """The flat batch of a scheduled step, every row rebuilt; block tables come with the
    schedule (or, packed already, as `block_tables`: see worker/persistent_batch.py)."""
    batch = HostBatch(out.block_size)
    for i, sr in enumerate(out.scheduled):
        req = sr.request
        tokens = req.all_token_ids
        if sr.num_spec_tokens:
            tokens = tokens + req.spec_token_ids
        if sr.num_new_tokens == 1:
            # Past the known tokens: async scheduling feeds this id from the GPU.
            new = [tokens[sr.start] if sr.start < len(tokens) else 0]
        else:
            new = tokens[sr.start : sr.end]
        row0 = batch.add(new, sr.start, sr.block_table, sr.kv_offset)
        if req.kv_compression_pending and req.kv_compression is not None:
            window = window_positions(req.kv_compression, req.num_tokens, sr.start, sr.end)
            if window:
                lo = row0 + window.start - sr.start
                batch.capture_rows.extend(range(lo, lo + len(window)))
                batch.capture_jobs.append((i, window.start, len(window)))
        if sr.samples:
            k = sr.num_spec_tokens
            last = row0 + sr.num_new_tokens - 1
            batch.sample_rows.append(list(range(last - k, last + 1)))
            batch.sample_sched_index.append(i)
        if req.wants_prompt_logprobs and sr.start < req.num_prompt_tokens - 1:
            # Row for position p predicts prompt token p + 1.
            hi = min(sr.end, req.num_prompt_tokens - 1)
            rows = list(range(row0, row0 + hi - sr.start))
            targets = req.prompt_token_ids[sr.start + 1 : hi + 1]
            batch.prompt_logprobs.append(PromptLogprobsJob(i, rows, targets))
    host = batch.finish(block_tables)
    add_layer_inputs(host, out)
    return host


def add_layer_inputs(host: HostInputs, out: SchedulerOutput) -> None:
    """PyramidKV: each layer's own seq_lens and slots, when some request needs them."""
    first = next((sr.layer_shift for sr in out.scheduled if sr.layer_shift is not None), None)
    if first is None:
        return
    qsl = host.query_start_loc
    reqs = [
        (
            int(qsl[b]),
            int(qsl[b + 1] - qsl[b]),
            sr.start - sr.kv_offset,
            sr.block_table,
            sr.layer_shift,
        )
        for b, sr in enumerate(out.scheduled)
    ]
    host.layer_seq_lens, host.layer_slot_mapping = layer_inputs(
        reqs, host.slot_mapping, host.seq_lens, len(first), out.block_size
    )


def pack_block_tables(tables: Sequence[Sequence[int]]) -> np.ndarray:
    """[B, longest] int32, each request's block ids then zeros (never read: seq_lens bound)."""
    bt = np.zeros((len(tables), max((len(t) for t in tables), default=1) or 1), dtype=np.int32)
    for r, t in enumerate(tables):
        bt[r, : len(t)] = t
    return bt


def to_device(host: HostInputs, device: torch.device, tiles: TileSpec | None = None) -> StepInputs:
    """The step's arrays on `device`; `tiles`: also prefill round 2's flat-grid tile map
    (cuda/prefill_tiles.py) cut for that (group, BM), on steps with q_len > 1."""
    if host.device is not None:
        raise ValueError("a device-built step has no host arrays to copy (DeviceStepState)")

    def dev(a: np.ndarray) -> torch.Tensor:
        return host_to_device(torch.from_numpy(a), device)

    md = AttentionMetadata(
        query_start_loc=dev(host.query_start_loc),
        seq_lens=dev(host.seq_lens),
        block_tables=dev(host.block_tables),
        slot_mapping=dev(host.slot_mapping),
        max_query_len=host.max_query_len,
        max_seq_len=host.max_seq_len,
    )
    if host.capture_rows:
        md.capture = QueryCapture(dev(np.asarray(host.capture_rows, dtype=np.int64)))
    if host.layer_seq_lens is not None and host.layer_slot_mapping is not None:
        md.layer_seq_lens = dev(host.layer_seq_lens)
        md.layer_slot_mapping = dev(host.layer_slot_mapping)
    if host.max_query_len > 1 and decode_split.enabled():
        md.decode_split = decode_split.split_metadata(
            md, host.query_start_loc, host.seq_lens, dev, tiles
        )
    if tiles is not None and host.max_query_len > 1 and md.decode_split is None:
        md.prefill_tiles = dev(build_tile_map(host.query_start_loc, host.seq_lens, tiles))
        md.prefill_tile_spec = tiles
    return StepInputs(dev(host.input_ids), dev(host.positions), md, host)


@dataclass
class PaddedInputs:
    """Host views of a CUDA graph's static inputs (pinned memory on GPU, plain on CPU).

    A graph of `num_reqs` requests and `num_tokens` token rows reads the prefixes
    [:num_tokens] of the token arrays and [:num_reqs (+ 1)] of the request arrays.
    """

    input_ids: np.ndarray  # [max_tokens] int64
    positions: np.ndarray  # [max_tokens] int64
    slot_mapping: np.ndarray  # [max_tokens] int64
    query_start_loc: np.ndarray  # [max_reqs + 1] int32
    seq_lens: np.ndarray  # [max_reqs] int32
    block_tables: np.ndarray  # [max_reqs, max_blocks] int32


def pad_inputs(host: HostInputs, dst: PaddedInputs, num_reqs: int, num_tokens: int) -> None:
    """Write this step's inputs into a graph's buffers, padded to its shape.

        step:  A verifies 1 + 2 tokens, B decodes 1; graph of 4 requests x 4 rows each
        rows:          [a a a b | pad ...................]   T = 4, num_tokens = 16
        slot_mapping:  [s s s s | -1 ....................]   (-1: the KV write skips it)
        query_start:   [0 3 4 | 4 4]                        (padding requests: q_len 0)
        seq_lens:      [la lb | 0 0]                        (kernels exit early on 0)

    Only the real rows and the slots of the padding rows are written: stale ids and
    positions in padding rows are valid values whose results nobody reads.
    """
    if host.device is not None:
        raise ValueError("a device-built step has no host arrays to pad (DeviceStepState)")
    b, t = len(host.seq_lens), host.num_tokens
    if b > num_reqs or t > num_tokens:
        raise ValueError(f"step of {b} requests / {t} tokens exceeds graph {num_reqs}/{num_tokens}")
    dst.input_ids[:t] = host.input_ids
    dst.positions[:t] = host.positions
    dst.slot_mapping[:t] = host.slot_mapping
    dst.slot_mapping[t:num_tokens] = -1
    dst.query_start_loc[: b + 1] = host.query_start_loc
    dst.query_start_loc[b + 1 : num_reqs + 1] = t
    dst.seq_lens[:b] = host.seq_lens
    dst.seq_lens[b:num_reqs] = 0
    dst.block_tables[:b, : host.block_tables.shape[1]] = host.block_tables


# The eager LM head's row counts on the GPU are multiples of this (lm_head_rows).
LM_HEAD_ROW_BUCKET = 16


def lm_head_rows(n: int) -> int:
    """The rows the eager LM head runs over on the GPU for n sampled rows: n rounded up to
    a multiple of LM_HEAD_ROW_BUCKET. cuBLAS's first GEMM at a new row count can hold the
    host until the GPU drains (80-180 ms inside W2's mixed steps on the H200, BENCHMARKS
    session 12), so the counts stay within the few that ModelRunner.warm_lm_head runs at
    start-up."""
    return -(-n // LM_HEAD_ROW_BUCKET) * LM_HEAD_ROW_BUCKET


def padded_rows(rows: list[int], total: int) -> list[int]:
    """`rows` followed by lm_head_rows(len(rows)) - len(rows) more of x's `total` rows:
    the ones after them when the rows are consecutive and x has them (take_rows stays a
    slice), else repeats of the last. Their logits are computed and dropped."""
    n = len(rows)
    pad = lm_head_rows(n) - n
    if pad == 0:
        return rows
    if rows[-1] - rows[0] == n - 1 and rows[-1] + pad < total:
        return list(range(rows[0], rows[-1] + pad + 1))
    return rows + [rows[-1]] * pad


def take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] without a host sync: a slice when the rows are consecutive, else an index
    copied from pinned memory (indexing with a Python list copies it synchronously)."""
    if rows and rows[-1] - rows[0] == len(rows) - 1 and rows == list(range(rows[0], rows[-1] + 1)):
        return x[rows[0] : rows[-1] + 1]
    return x.index_select(0, host_to_device(torch.tensor(rows, dtype=torch.long), x.device))
