"""Step inputs: flattening a scheduled step, and picking rows without a host sync."""

from __future__ import annotations

import torch

from ipc.messages import SamplingParams
from worker.config import SchedulerConfig
from worker.input_batch import (
    LM_HEAD_ROW_BUCKET,
    build_host_inputs,
    lm_head_rows,
    padded_rows,
    take_rows,
)
from worker.kv_cache import KVCacheManager
from worker.request import Request
from worker.scheduler import Scheduler


def test_take_rows_equals_indexing():
    x = torch.arange(40).view(20, 2)
    for rows in ([3], [2, 3, 4], [0, 5, 1], [19, 18], []):
        assert torch.equal(take_rows(x, rows), x[rows])


def test_lm_head_rows_are_buckets():
    b = LM_HEAD_ROW_BUCKET
    assert [lm_head_rows(n) for n in (1, b - 1, b, b + 1, 5 * b)] == [b, b, b, 2 * b, 5 * b]


def test_padded_rows_keep_the_rows_first():
    b = LM_HEAD_ROW_BUCKET
    # consecutive rows with room after them: a longer run (take_rows stays a slice)
    assert padded_rows([3, 4, 5], 100) == list(range(3, 3 + b))
    # consecutive rows at the end of x: repeats of the last
    assert padded_rows([97, 98, 99], 100) == [97, 98, 99] + [99] * (b - 3)
    # scattered rows: repeats of the last
    assert padded_rows([7, 2, 40], 100) == [7, 2, 40] + [40] * (b - 3)
    full = list(range(5, 5 + b))
    assert padded_rows(full, 100) == full
    x = torch.arange(200).view(100, 2)
    for rows in ([3, 4, 5], [97, 98, 99], [7, 2, 40], [0]):
        p = padded_rows(rows, 100)
        assert len(p) == lm_head_rows(len(rows))
        assert torch.equal(take_rows(x, p)[: len(rows)], x[rows])


def test_flat_batch_layout():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=False)
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), kv
    )
    a = Request("a", [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=4), frozenset())
    b = Request("b", [11, 12], SamplingParams(max_tokens=4), frozenset())
    sched.add_request(a)
    sched.add_request(b)
    host = build_host_inputs(sched.schedule())
    assert host.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert host.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert host.query_start_loc.tolist() == [0, 6, 8] and host.seq_lens.tolist() == [6, 2]
    ta, tb = kv.block_ids("a"), kv.block_ids("b")
    expect = [ta[p // 4] * 4 + p % 4 for p in range(6)] + [tb[0] * 4, tb[0] * 4 + 1]
    assert host.slot_mapping.tolist() == expect
    assert host.block_tables[0, :2].tolist() == ta and host.block_tables[1, 0] == tb[0]
    assert host.sample_rows == [[5], [7]]
