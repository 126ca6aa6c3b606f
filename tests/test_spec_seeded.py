"""Seeded sampling with n-gram speculation draws exactly the tokens it draws without.

n-gram verification emits each row's plain decode draw (worker/spec_decode/verify.py), so
a seeded request's tokens do not depend on speculation, on how many of its proposals the
token budget kept (max_num_batched_tokens 2 and 3 cut k = 4 proposals to 1 and 2), or on
the requests it shares its steps with.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ipc.messages import SamplingParams
from tests.conftest import STORIES

K = 4
MAX_TOKENS = 24
# Repetitive stories text: the n-gram lookup finds matches, the model often follows them.
TEXTS = [
    "Tom had a big red ball. Tom had a big red ball. Tom had a big red",
    "Lily saw a cat. The cat was big. Lily saw a cat. The cat was",
]
OTHER_TEXTS = ["Once upon a time", "The dog ran to the park and the dog ran to the"]
SEEDED = [
    dict(top_p=1.0, top_k=0),
    dict(top_p=0.9, top_k=0),
    dict(top_p=1.0, top_k=20),
    dict(top_p=0.95, top_k=40, min_p=0.05, repetition_penalty=1.1),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """A tiny model runs faster on one thread than on a shared machine's many."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[list[int]]]:
    from gateway.tokenizer import load_tokenizer

    tok = load_tokenizer(str(STORIES))
    return {
        "seeded": [tok.encode(t) for t in TEXTS],
        "other": [tok.encode(t) for t in OTHER_TEXTS],
    }


def seeded_params() -> list[SamplingParams]:
    """Every (prompt, variant) pair, each with its own seed."""
    return [
        SamplingParams(
            temperature=0.8, seed=100 + i, max_tokens=MAX_TOKENS, ignore_eos=True, **variant
        )
        for i, variant in enumerate(SEEDED * len(TEXTS))
    ]


def engine(**args: Any) -> Any:
    from headrace.llm import LLM

    return LLM(str(STORIES), device="cpu", block_size=4, **args)


def tokens(llm: Any, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in llm.generate(prompts, params)]


def test_seeded_tokens_do_not_depend_on_speculation_budget_or_batch(prompts):
    params = seeded_params()
    seeded = [p for p in prompts["seeded"] for _ in SEEDED]
    plain = engine()
    want = [tokens(plain, [p], [sp])[0] for p, sp in zip(seeded, params, strict=True)]
    assert len({tuple(t) for t in want}) == len(want)  # the seeds matter: not greedy
    spec = dict(speculative_method="ngram", num_speculative_tokens=K, ngram_prompt_lookup_max=3)
    # One request at a time: budgets 2 and 3 truncate every step's proposals.
    for budget in (2, 3, 64):
        llm = engine(max_num_batched_tokens=budget, **spec)
        for prompt, sp, w in zip(seeded, params, want, strict=True):
            assert tokens(llm, [prompt], [sp]) == [w], f"budget {budget}, {sp}"
        stats = llm.engine.stats()
        assert stats.spec_accepted > 0, f"budget {budget}: no proposal was accepted"
    # Batched with other requests (unseeded, and seeded with another seed), in two orders.
    others = [
        SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=5, seed=7, max_tokens=9, ignore_eos=True),
    ]
    mix, mix_params = prompts["other"] + seeded, others + params
    for budget, seqs in ((5, 3), (16, 8), (64, 4)):
        llm = engine(max_num_batched_tokens=budget, max_num_seqs=seqs, **spec)
        got = tokens(llm, mix, mix_params)
        assert got[len(others) :] == want, f"batched, budget {budget}"
        got = tokens(llm, mix[::-1], mix_params[::-1])
        assert got[::-1][len(others) :] == want, f"batched reversed, budget {budget}"
        assert llm.engine.stats().spec_accepted > 0
