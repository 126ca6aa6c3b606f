"""Issue 12 on the GPU: the persistent input batch equals the rebuilt inputs under CUDA
graphs (HEADRACE_INPUT_BATCH=rebuild is the old builder), and the step timeline's CUDA
events give busy and gap times."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.helpers import generate
from tests.test_golden import check_logprobs_close, prompts_of_different_lengths
from tests.tiny_models import tiny_model_hd64

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

ARGS = dict(device="cuda", dtype="float16", block_size=16, max_num_seqs=32, max_model_len=512)


def test_persistent_batch_equals_rebuild_with_graphs(tmp_path, stories_path, monkeypatch):
    path = tiny_model_hd64(tmp_path, stories_path)
    prompts = prompts_of_different_lengths()  # 9 requests: the vectorized decode path
    monkeypatch.setenv("HEADRACE_INPUT_BATCH", "rebuild")
    old = generate(path, prompts, max_tokens=120, **ARGS)
    monkeypatch.setenv("HEADRACE_INPUT_BATCH", "persistent")
    new = generate(path, prompts, max_tokens=120, **ARGS)
    assert new.graphs and new.replays[1] > 0
    assert [t for t, _ in new.out] == [t for t, _ in old.out]
    check_logprobs_close(new.out, old.out, "persistent-vs-rebuild", atol=1e-3)


def test_step_timeline_measures_gpu_busy_and_gaps(tmp_path, stories_path):
    from headrace.llm import LLM
    from ipc.messages import SamplingParams
    from worker.step_timeline import StepTimeline

    path = tiny_model_hd64(tmp_path, stories_path)
    llm = LLM(str(path), kv_cache_memory_gb=2.0, **ARGS)
    try:
        timeline = StepTimeline(llm.engine).attach()
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        llm.generate(prompts_of_different_lengths(), params)
        timeline.detach()
        summary = timeline.summary()
    finally:
        llm.close()
    decode = summary["decode/graph"]
    assert decode["steps"] >= 30 and 1 <= decode["reqs"] <= 9
    assert decode["gpu_busy_ms"] is not None and decode["gpu_busy_ms"] > 0
    assert decode["gap_ms"] is not None and decode["gap_ms"] >= 0
    assert summary["prefill/eager"]["steps"] >= 1
    assert all(r.busy_ms is not None for r in timeline.records)
