"""HEADRACE_STEP_INPUTS=numba on the GPU: the device state and its Numba kernels on torch's
stream (eagerly and inside the decode CUDA graphs) give the host path's inputs and tokens."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.helpers import generate
from tests.test_golden import check_logprobs_close, prompts_of_different_lengths
from tests.tiny_models import tiny_model_hd64

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

ARGS = dict(device="cuda", dtype="float16", max_num_seqs=32, max_model_len=512)


@pytest.mark.parametrize("seed", range(3))
def test_device_state_equals_the_host_builder_on_gpu(seed: int) -> None:
    from tests.test_device_inputs import check_device_state

    check_device_state(seed, torch.device("cuda"))


@pytest.mark.parametrize("block_size", [16, 32])
def test_graphs_replay_equal_eager_and_the_host_path(
    tmp_path, stories_path, monkeypatch, block_size
):
    path = tiny_model_hd64(tmp_path, stories_path)
    prompts = prompts_of_different_lengths()
    args = dict(ARGS, block_size=block_size)
    monkeypatch.delenv("HEADRACE_STEP_INPUTS", raising=False)
    host = generate(path, prompts, max_tokens=100, **args)
    monkeypatch.setenv("HEADRACE_STEP_INPUTS", "numba")
    graphs = generate(path, prompts, max_tokens=100, **args)
    eager = generate(path, prompts, max_tokens=100, enforce_eager=True, **args)
    assert graphs.graphs and graphs.replays[1] > 50 and not eager.graphs
    for other, name in ((host, "numba-vs-host"), (eager, "graphs-vs-eager")):
        assert [t for t, _ in graphs.out] == [t for t, _ in other.out], name
        check_logprobs_close(graphs.out, other.out, name, atol=1e-3)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_greedy_graphs_tokens_equal_the_host_path(
    tmp_path, stories_path, monkeypatch, async_scheduling
):
    """No logprobs: decode steps replay the greedy graphs (kernels, model, argmax)."""
    from headrace.llm import LLM
    from ipc.messages import SamplingParams

    path = tiny_model_hd64(tmp_path, stories_path)
    prompts = prompts_of_different_lengths()
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    outs, replays = [], []
    for mode in ("host", "numba"):
        monkeypatch.setenv("HEADRACE_STEP_INPUTS", mode)
        llm = LLM(str(path), kv_cache_memory_gb=2.0, async_scheduling=async_scheduling, **ARGS)
        try:
            outs.append([r.outputs[0].token_ids for r in llm.generate(prompts, params)])
            replays.append(llm.engine.runner.graph_runner.greedy_replays)
        finally:
            llm.close()
    assert outs[1] == outs[0]
    assert replays[1] > 50 and replays[0] > 50
