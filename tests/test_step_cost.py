"""The schedule simulator's step-cost model (scripts/step_cost.py) and its --admission runs."""

from __future__ import annotations

import argparse

import pytest

from ipc.messages import SamplingParams
from scripts import sim_async_schedule
from scripts.step_cost import COPY_BW, COSTS, HEAD_PARAMS, LINEAR_PARAMS
from worker.request import Request
from worker.scheduler import ScheduledRequest, SchedulerOutput


def _row(num_tokens: int, start: int, new: int) -> ScheduledRequest:
    req = Request("r", list(range(1, num_tokens + 1)), SamplingParams(max_tokens=8), frozenset())
    return ScheduledRequest(req, new, start)


def test_decode_step_is_weights_plus_kv_bytes() -> None:
    cost = COSTS["bf16"]
    # One decode row at position 999: a weight-bound GEMV, 1,000 tokens of KV read.
    out = SchedulerOutput([_row(1000, 999, 1)], num_batched_tokens=1)
    weights = (LINEAR_PARAMS + HEAD_PARAMS) * 2 / COPY_BW
    kv = 1000 * 2 * 32 * 8 * 128 * 2 / (COPY_BW * cost.decode_efficiency)
    assert cost.step_seconds(out) == pytest.approx(weights + kv + cost.step_fixed_s)


def test_prefill_step_is_compute_bound_and_pays_the_host_gap() -> None:
    cost = COSTS["bf16"]
    out = SchedulerOutput([_row(4096, 0, 4096)], num_batched_tokens=4096)
    linear = 2 * LINEAR_PARAMS * 4096 / cost.gemm_flops
    attn = 4 * 32 * 32 * 128 * (4096 * 4097 / 2) / cost.prefill_attn_flops
    head = HEAD_PARAMS * 2 / COPY_BW  # one sampled row: the head is a weight read
    expected = linear + attn + head + cost.step_fixed_s + cost.mixed_host_s
    assert cost.step_seconds(out) == pytest.approx(expected)
    # FP8 halves the KV bytes of a decode row.
    dec = SchedulerOutput([_row(1000, 999, 1)], num_batched_tokens=1)
    fp8 = COSTS["fp8"]
    kv8 = 1000 * 2 * 32 * 8 * 128 / (COPY_BW * fp8.decode_efficiency)
    assert fp8.step_seconds(dec) == pytest.approx(
        LINEAR_PARAMS / COPY_BW + HEAD_PARAMS * 2 / COPY_BW + kv8 + fp8.step_fixed_s
    )


def _args(**kw: object) -> argparse.Namespace:
    base = dict(
        workload="W2",
        num_requests=24,
        seed=0,
        max_num_seqs=64,
        max_num_batched_tokens=4096,
        max_model_len=4096,
        block_size=16,
        num_blocks=2000,  # 32k tokens: 24 requests of 2,000 need 48k, so some must wait
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_reserve_admission_avoids_the_preemptions_of_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cost = COSTS["bf16"]
    monkeypatch.setenv("HEADRACE_ADMISSION", "")
    default = sim_async_schedule.simulate(_args(), False, cost)
    monkeypatch.setenv("HEADRACE_ADMISSION", "reserve")
    reserve = sim_async_schedule.simulate(_args(), False, cost)
    assert default["preemptions"] > 0
    assert reserve["preemptions"] == 0
    assert default["output_tokens"] == reserve["output_tokens"] == 24 * 1000
    assert default["gpu_s"] > 0 and reserve["gpu_s"] > 0
