"""Flattening one scheduled step into model inputs (no padding).

    scheduled:   A: prefill chunk, tokens 0..5      B: decode at position 9
    input_ids:   [a0 a1 a2 a3 a4 a5 | b9]
    positions:   [ 0  1  2  3  4  5 |  9]
    query_start: [0, 6, 7]           seq_lens: [6, 10]
    slot_mapping: block_table[p // block_size] * block_size + p % block_size, per token

Built with numpy on the host, then copied to the device in one go per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from worker.attention import AttentionMetadata
from worker.kv_cache import KVCacheManager
from worker.scheduler import SchedulerOutput


@dataclass
class PromptLogprobsJob:
    sched_index: int  # which scheduled request
    rows: list[int]  # rows of the flat batch whose logits predict the next prompt token
    targets: list[int]  # the prompt tokens those rows predict


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    md: AttentionMetadata
    # For each scheduled request that samples: its rows (1, or 1 + k with speculation).
    sample_rows: list[list[int]]
    sample_sched_index: list[int]
    prompt_logprobs: list[PromptLogprobsJob] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_step_inputs(
    out: SchedulerOutput, kv: KVCacheManager, device: torch.device, pin: bool = False
) -> StepInputs:
    bs = kv.block_size
    ids: list[np.ndarray] = []
    pos: list[np.ndarray] = []
    slots: list[np.ndarray] = []
    qsl = [0]
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    sample_rows: list[list[int]] = []
    sample_idx: list[int] = []
    plp: list[PromptLogprobsJob] = []
    for i, sr in enumerate(out.scheduled):
        req = sr.request
        tokens = req.all_token_ids
        if sr.num_spec_tokens:
            tokens = tokens + req.spec_token_ids
        p = np.arange(sr.start, sr.end, dtype=np.int64)
        table = kv.block_ids(req.request_id)
        table_np = np.asarray(table, dtype=np.int64)
        ids.append(np.asarray(tokens[sr.start : sr.end], dtype=np.int64))
        pos.append(p)
        slots.append(table_np[p // bs] * bs + p % bs)
        row0 = qsl[-1]
        qsl.append(row0 + sr.num_new_tokens)
        seq_lens.append(sr.end)
        tables.append(table)
        if sr.samples:
            k = sr.num_spec_tokens
            last = row0 + sr.num_new_tokens - 1
            sample_rows.append(list(range(last - k, last + 1)))
            sample_idx.append(i)
        if req.wants_prompt_logprobs and sr.start < req.num_prompt_tokens - 1:
            # Row for position p predicts prompt token p + 1.
            hi = min(sr.end, req.num_prompt_tokens - 1)
            rows = list(range(row0, row0 + hi - sr.start))
            targets = req.prompt_token_ids[sr.start + 1 : hi + 1]
            plp.append(PromptLogprobsJob(i, rows, targets))
    max_blocks = max((len(t) for t in tables), default=1)
    bt = np.zeros((len(tables), max(max_blocks, 1)), dtype=np.int32)
    for r, t in enumerate(tables):
        bt[r, : len(t)] = t

    def dev(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if device.type == "cpu":
            return t
        if pin:
            t = t.pin_memory()
        return t.to(device, non_blocking=pin)

    md = AttentionMetadata(
        query_start_loc=dev(np.asarray(qsl, dtype=np.int32)),
        seq_lens=dev(np.asarray(seq_lens, dtype=np.int32)),
        block_tables=dev(bt),
        slot_mapping=dev(np.concatenate(slots) if slots else np.zeros(0, np.int64)),
        max_query_len=max((sr.num_new_tokens for sr in out.scheduled), default=0),
        max_seq_len=max(seq_lens, default=0),
    )
    return StepInputs(
        input_ids=dev(np.concatenate(ids) if ids else np.zeros(0, np.int64)),
        positions=dev(np.concatenate(pos) if pos else np.zeros(0, np.int64)),
        md=md,
        sample_rows=sample_rows,
        sample_sched_index=sample_idx,
        prompt_logprobs=plp,
    )
