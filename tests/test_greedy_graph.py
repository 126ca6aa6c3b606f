"""Greedy decode steps served by the graph that ends in the argmax (worker/cuda_graphs.py),
on CPU: the rows it may serve are exactly those whose sampler draw is the raw argmax, and
an engine whose runner takes that path (eagerly here, as a graph replay does on the GPU)
generates the same tokens as one that samples as usual."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ipc.messages import SamplingParams
from worker.input_batch import HostInputs, to_device
from worker.sampler import Sampler, SamplingBatch, argmax_tokens, plain_greedy

VOCAB = 50


def _batch(params: list[SamplingParams], outputs: list[list[int]]) -> SamplingBatch:
    return SamplingBatch(
        params=params, prompt_token_ids=[[1, 2]] * len(params), output_token_ids=outputs
    )


def test_plain_greedy_rows_are_the_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB + 14, generator=g)
    logits[:, VOCAB:] = 100.0  # embedding padding: never a token
    logits[2, 7] = logits[2, 9] = 50.0  # a tie: the first index wins on both paths
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3]),
        SamplingParams(temperature=1e-6, max_tokens=4),
        SamplingParams(temperature=0.0, ignore_eos=True, seed=5),
        SamplingParams(temperature=0.0, top_k=3, top_p=0.5),  # filters: moot when greedy
        SamplingParams(temperature=0.0),
    ]
    outputs = [[], [4, 5], [6], [], [1], [2, 3, 4]]
    assert all(plain_greedy(p, len(o)) for p, o in zip(params, outputs, strict=True))
    want = Sampler(VOCAB, {0}).draw(logits, _batch(params, outputs))
    got = argmax_tokens(logits, VOCAB)
    assert torch.equal(got, want) and int(got[2]) == 7


@pytest.mark.parametrize(
    ("params", "num_out"),
    [
        (SamplingParams(temperature=0.7), 0),
        (SamplingParams(temperature=0.0, logprobs=0), 0),
        (SamplingParams(temperature=0.0, repetition_penalty=1.1), 0),
        (SamplingParams(temperature=0.0, frequency_penalty=0.5), 0),
        (SamplingParams(temperature=0.0, presence_penalty=-0.5), 0),
        (SamplingParams(temperature=0.0, min_tokens=3), 2),  # EOS still banned this step
    ],
)
def test_rows_that_need_the_sampler(params: SamplingParams, num_out: int) -> None:
    assert not plain_greedy(params, num_out)


class EagerGreedyRunner:
    """CudaGraphRunner's greedy interface, run eagerly: what one replay of a greedy graph
    computes (the forward, compute_logits, argmax_tokens), counted."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.greedy_steps = 0

    def can_run(self, host: HostInputs) -> bool:
        return False  # other steps run eagerly, as on CPU

    def can_run_greedy(self, host: HostInputs) -> bool:
        return host.max_query_len == 1

    def run_greedy(self, host: HostInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        r = self.runner
        inputs = to_device(host, r.device)
        ids = inputs.input_ids if input_ids is None else input_ids
        hidden = r.model(ids, inputs.positions, r.kv_caches, inputs.md)
        self.greedy_steps += 1
        logits = r.model.compute_logits(hidden[: len(host.seq_lens)])
        return argmax_tokens(logits, r.config.vocab_size)


def _generate(path: Any, params: list[SamplingParams], greedy: bool, **engine_args: Any) -> Any:
    from headrace.llm import LLM

    llm = LLM(str(path), device="cpu", **engine_args)
    stub = None
    if greedy:
        stub = EagerGreedyRunner(llm.engine.runner)
        llm.engine.runner.graph_runner = stub  # type: ignore[assignment]
    prompts = [[1, 403, 407, 261, 378], [1, 306, 101], [1, 98, 251, 263]]
    outs = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    llm.engine.runner.graph_runner = None
    llm.close()
    return outs, stub.greedy_steps if stub is not None else 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_graph_path_generates_the_same_tokens(
    stories_path: Any, async_scheduling: bool
) -> None:
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    params = [plain, plain, plain]
    want, _ = _generate(stories_path, params, False, async_scheduling=async_scheduling)
    got, steps = _generate(stories_path, params, True, async_scheduling=async_scheduling)
    assert got == want
    assert steps >= 10  # every decode step after the prefill took the greedy path


def test_a_row_with_logprobs_keeps_the_sampler(stories_path: Any) -> None:
    plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    params = [
        plain,
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2),
        plain,
    ]
    want, _ = _generate(stories_path, params, False)
    got, steps = _generate(stories_path, params, True)
    assert got == want
    # steps with the logprobs request in the batch sample as usual; after it finishes (all
    # three finish together here) none are left, so no step took the greedy path
    assert steps == 0
