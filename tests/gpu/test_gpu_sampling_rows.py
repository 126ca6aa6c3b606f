"""Sampling rows kept across steps on the GPU: the penalty pool's index_put (atomic adds),
gathers and the seeded keys on the device give the per-step rebuild's tokens bit for bit,
and the engine's randomized workloads give the rebuild's tokens (sync and async)."""

from __future__ import annotations

import pytest
import torch

from tests.test_async_overlap import draw_workload, drive
from tests.test_sampling_rows import check_kept_rows

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("seed", range(4))
def test_kept_rows_equal_the_rebuild_on_cuda(seed: int) -> None:
    check_kept_rows(seed, torch.device("cuda"))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_tokens_equal_the_rebuilds_on_cuda(
    stories_path, monkeypatch, async_scheduling: bool
) -> None:
    for seed in range(3):
        w = draw_workload(seed)
        args = dict(device="cuda", dtype="float32", kv_cache_memory_gb=1.0)
        kept = drive(str(stories_path), w, async_scheduling, **args)
        monkeypatch.setenv("HEADRACE_SAMPLING_BATCH", "rebuild")
        rebuilt = drive(str(stories_path), w, async_scheduling, **args)
        monkeypatch.delenv("HEADRACE_SAMPLING_BATCH")
        assert kept.engine.runner.sampling_rows is not None
        assert kept.tokens == rebuilt.tokens, seed
        assert kept.finish == rebuilt.finish, seed
        kept.engine.shutdown()
        rebuilt.engine.shutdown()
