"""Speculative decoding end to end on CPU: n-gram lookup and draft models inside the engine.

Greedy outputs must be token-identical with and without speculation, in constrained
batches (block_size 4, few KV blocks, a small token budget) where requests are preempted
and recomputed and where speculating and plain requests share steps. With the target as
its own draft every proposal is accepted. Seeded sampling repeats itself.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from ipc.messages import SamplingParams
from worker.spec_decode.ngram import ngram_lookup

MAX_TOKENS = 16
ENGINE_ARGS = dict(
    block_size=4,
    max_num_batched_tokens=16,  # prefills are chunked, proposals compete for the budget
    num_gpu_blocks=20,  # 80 slots for 6 requests of up to 36 tokens + proposals: preemption
    max_num_seqs=6,
    device="cpu",
)
STORIES_TEXTS = [
    "Once upon a time",
    "Lily",
    "The dog ran to the park and",
    "One day, a little bird",
    "Tom had a big red ball. Tom had a big red",
    "Ben and",
]


# ---- n-gram lookup ----------------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_suffix():
    tokens = [5, 6, 7, 8, 9, 1, 5, 6, 7]
    assert ngram_lookup(tokens, 3, 1, 4) == [8, 9, 1]
    assert ngram_lookup(tokens, 10, 1, 4) == [8, 9, 1, 5, 6, 7]  # capped by the sequence


def test_ngram_prefers_the_longest_match_and_respects_bounds():
    # Suffix [2, 3]: the 2-gram occurs at 4 (followed by 9), the 1-gram [3] also at 0 (-> 7).
    tokens = [3, 7, 0, 0, 2, 3, 9, 2, 3]
    assert ngram_lookup(tokens, 1, 1, 4) == [9]
    assert ngram_lookup(tokens, 1, 1, 1) == [9]  # latest 1-gram [3] is at 5, followed by 9
    assert ngram_lookup(tokens, 2, 3, 4) == []  # no 3-gram repeats
    assert ngram_lookup([4], 2, 1, 4) == []
    assert ngram_lookup([1, 2, 3, 4], 2, 1, 4) == []


# ---- helpers ------------------------------------------------------------------------------------
def run(path: Path, prompts, params, **engine_args):
    from headrace.llm import LLM

    llm = LLM(str(path), **{**ENGINE_ARGS, **engine_args})
    mixed = []  # per step: (some request verified proposals, some sampled one row)
    schedule = llm.engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        samplers = [sr for sr in out.scheduled if sr.samples]
        mixed.append(
            any(sr.num_spec_tokens for sr in samplers)
            and any(not sr.num_spec_tokens for sr in samplers)
        )
        return out

    llm.engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    results = llm.generate(prompts, params)
    outs = [r.outputs[0] for r in results]
    return [o.token_ids for o in outs], [o.logprobs for o in outs], llm.engine, any(mixed)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def assert_logprobs_close(a, b) -> None:
    for seq_a, seq_b in zip(a, b, strict=True):
        for lp_a, lp_b in zip(seq_a, seq_b, strict=True):
            assert lp_a.token_ids[0] == lp_b.token_ids[0]
            assert math.isclose(lp_a.logprobs[0], lp_b.logprobs[0], abs_tol=1e-3)


def save_random_llama(
    path: Path, hidden: int, layers: int, vocab: int = 512, seed: int = 3
) -> Path:
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).float().eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory) -> Path:
    """A random model far smaller than stories260K, sharing its vocabulary size (512)."""
    return save_random_llama(tmp_path_factory.mktemp("draft"), hidden=16, layers=1)


@pytest.fixture(scope="module")
def stories_prompts() -> list[list[int]]:
    from tests.conftest import STORIES

    if not (STORIES / "config.json").exists():
        pytest.skip("stories260K not found")
    from gateway.tokenizer import load_tokenizer

    tok = load_tokenizer(str(STORIES))
    return [tok.encode(t) for t in STORIES_TEXTS]


# ---- greedy: identical tokens ---------------------------------------------------------------
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_stories260k_identical_with_speculation(
    stories_path, stories_prompts, small_draft, prefix_caching
):
    params = greedy(logprobs=2)
    args = dict(enable_prefix_caching=prefix_caching)
    base, base_lps, engine, _ = run(stories_path, stories_prompts, params, **args)
    assert engine.scheduler.num_preemptions > 0, "the test meant to force preemption"
    cases = {
        "ngram": dict(speculative_method="ngram", num_speculative_tokens=3),
        "self-draft": dict(speculative_model=str(stories_path), num_speculative_tokens=3),
        "small-draft": dict(speculative_model=str(small_draft), num_speculative_tokens=2),
    }
    for name, spec in cases.items():
        tokens, lps, engine, mixed = run(stories_path, stories_prompts, params, **args, **spec)
        assert tokens == base, name
        assert_logprobs_close(lps, base_lps)
        stats = engine.stats()
        assert stats.spec_proposed > 0 and stats.spec_steps > 0, name
        assert engine.scheduler.num_preemptions > 0, name
        if name == "ngram":
            assert mixed, "some step should mix speculating and plain requests"
            assert 0 < stats.spec_accepted < stats.spec_proposed
        if name == "self-draft":
            assert stats.spec_accepted == stats.spec_proposed  # the draft is the target
        if name != "ngram":  # every draft block was given back
            draft = engine.proposer
            assert draft.kv.num_free_blocks == draft.kv.num_blocks
            draft.kv.check_invariants()
        engine.kv.check_invariants()


def test_greedy_tiny_random_model_identical_with_speculation(tmp_path, small_draft, stories_path):
    target = save_random_llama(tmp_path / "target", hidden=64, layers=3, seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = [[1, *torch.randint(3, 512, (n,), generator=g).tolist()] for n in (1, 4, 9, 17, 30)]
    prompts.append([1, 7, 8, 9, 10, 7, 8, 9, 10, 7, 8])  # a repetition n-gram lookup can follow
    tok = dict(tokenizer=str(stories_path))
    base, _, engine, _ = run(target, prompts, greedy(), **tok)
    assert engine.scheduler.num_preemptions > 0
    for spec in (
        dict(speculative_method="ngram", num_speculative_tokens=4, ngram_prompt_lookup_max=2),
        dict(speculative_model=str(small_draft), num_speculative_tokens=3),
        dict(speculative_model=str(target), num_speculative_tokens=2),
    ):
        tokens, _, engine, _ = run(target, prompts, greedy(), **tok, **spec)
        assert tokens == base, spec
        assert engine.stats().spec_proposed > 0
        if spec.get("speculative_model") == str(target):
            assert engine.stats().spec_accepted == engine.stats().spec_proposed


# ---- sampling: reproducible -------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(stories_path, stories_prompts):
    params = [
        SamplingParams(temperature=0.9, top_p=0.95, seed=11 + i, max_tokens=16, ignore_eos=True)
        for i in range(len(stories_prompts))
    ]
    roomy = dict(max_num_batched_tokens=256, num_gpu_blocks=200)
    for spec in (
        dict(speculative_method="ngram", num_speculative_tokens=3),
        dict(speculative_model=str(stories_path), num_speculative_tokens=3),
    ):
        first, _, engine, _ = run(stories_path, stories_prompts, params, **roomy, **spec)
        again, _, _, _ = run(stories_path, stories_prompts, params, **roomy, **spec)
        alone, _, _, _ = run(stories_path, stories_prompts[4:5], params[4:5], **roomy, **spec)
        assert first == again, spec
        assert alone == first[4:5], spec
        assert engine.stats().spec_accepted > 0
    assert len({tuple(t) for t in first}) == len(first)  # not greedy in disguise


# ---- configuration ---------------------------------------------------------------------------
def test_draft_with_another_vocabulary_is_refused(stories_path, tmp_path):
    other = save_random_llama(tmp_path / "other", hidden=16, layers=1, vocab=256)
    from headrace.llm import LLM

    with pytest.raises(ValueError, match="vocab"):
        LLM(str(stories_path), device="cpu", speculative_model=str(other), num_speculative_tokens=2)


@pytest.mark.parametrize(
    "args,message",
    [
        (dict(num_speculative_tokens=3), "needs a proposer"),
        (dict(speculative_method="ngram"), "num_speculative_tokens >= 1"),
        (dict(speculative_method="draft", num_speculative_tokens=2), "needs speculative_model"),
        (
            dict(speculative_method="ngram", speculative_model="x", num_speculative_tokens=2),
            "cannot be used with speculative_method 'ngram'",
        ),
        (dict(speculative_model="/nonexistent", num_speculative_tokens=2), "speculative_model: "),
    ],
)
def test_inconsistent_speculation_settings_are_refused(stories_path, args, message):
    from headrace.llm import LLM

    with pytest.raises(ValueError, match=message):
        LLM(str(stories_path), device="cpu", **args)


def test_cli_flags_name_the_problem_and_default_k():
    from headrace.engine_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(
        parser.parse_args(["--model", "m", "--speculative-method", "ngram"])
    )
    assert config.num_speculative_tokens == 4  # a method without a count: 4, as documented
    with pytest.raises(ValueError, match="invalid engine flag: num_speculative_tokens"):
        engine_config_from_args(
            parser.parse_args(["--model", "m", "--num-speculative-tokens", "2"])
        )


def test_no_proposer_without_speculation(stories_path):
    from headrace.llm import LLM

    assert LLM(str(stories_path), device="cpu").engine.proposer is None


def test_penalties_and_min_tokens_see_the_proposals(stories_path, stories_prompts):
    """Row j of a verification is processed as if the first j proposals were output."""
    params = greedy(repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=10)
    params.ignore_eos = False
    base, _, _, _ = run(stories_path, stories_prompts, params)
    spec = dict(speculative_model=str(stories_path), num_speculative_tokens=4)
    tokens, _, engine, _ = run(stories_path, stories_prompts, params, **spec)
    assert tokens == base
    stats = engine.stats()
    assert stats.spec_proposed > 0 and stats.spec_accepted == stats.spec_proposed
