"""The eager LM head on the GPU runs over a bucket of rows (worker/input_batch.py
lm_head_rows): the sampled rows' logits are the unpadded ones, at every bucket count."""

from __future__ import annotations

import pytest
import torch

from ipc.messages import SamplingParams
from worker.input_batch import LM_HEAD_ROW_BUCKET
from worker.request import Request

pytestmark = pytest.mark.gpu


def test_sampled_logits_run_over_buckets_and_keep_the_rows(stories_path) -> None:
    from headrace.llm import LLM

    llm = LLM(str(stories_path), device="cuda", dtype="bfloat16", kv_cache_memory_gb=0.5)
    try:
        runner = llm.engine.runner
        model = runner.model
        counts: list[int] = []
        for name in ("greedy_logits", "compute_logits"):
            inner = getattr(model, name)

            def record(x: torch.Tensor, inner=inner) -> torch.Tensor:
                counts.append(x.shape[0])
                return inner(x)

            setattr(model, name, record)
        g = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(100, runner.config.hidden_size, device="cuda", generator=g)
        hidden = hidden.to(runner.dtype)
        greedy = SamplingParams(temperature=0, max_tokens=4)
        sampled = SamplingParams(temperature=0.8, max_tokens=4)
        for rows in (
            [3],
            [3, 4, 5],
            [97, 98, 99],
            [7, 2, 40],
            list(range(16)),
            [0, *range(60, 80)],
        ):
            for params in (greedy, sampled):
                reqs = [Request(f"r{i}", [1, 2], params, frozenset()) for i in range(len(rows))]
                counts.clear()
                got = runner.sampled_logits(hidden, rows, reqs)
                assert counts and all(c % LM_HEAD_ROW_BUCKET == 0 for c in counts), counts
                want = model.lm_head(hidden[rows]).float()
                assert got.shape == want.shape
                torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    finally:
        llm.close()
