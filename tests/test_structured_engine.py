"""Structured output in the worker: masks, and engines whose outputs follow their grammar
(greedy and sampled, mixed with free requests, async scheduling, speculative decoding)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from headrace import LLM
from ipc.messages import EngineRequest, FinishReason, GrammarKind, GuidedDecoding, SamplingParams
from worker.structured import apply_bitmask, apply_bitmask_torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
JSON = GuidedDecoding(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
REGEX = GuidedDecoding(GrammarKind.REGEX, "(yes|no), [0-9]{2}")


@pytest.mark.parametrize("vocab", [100, 128256])
def test_apply_bitmask_matches_xgrammar(vocab):
    import xgrammar as xgr

    gen = torch.Generator().manual_seed(0)
    words = (vocab + 31) // 32
    logits = torch.randn(3, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=gen)
    bitmask[1] = -1  # a free row
    ours, ref, cpu = logits.clone(), logits.clone(), logits.clone()
    apply_bitmask_torch(ours, bitmask)  # what a GPU runs
    apply_bitmask(cpu, bitmask)
    xgr.apply_token_bitmask_inplace(ref, bitmask, vocab_size=vocab)
    assert torch.equal(ours, ref) and torch.equal(cpu, ref)
    assert torch.isinf(ours).any() and torch.isfinite(ours).any()
    assert torch.equal(ours[1], logits[1])
    # An odd view (a slice of wider logits) takes the torch path on a CPU too.
    wide = torch.randn(3, vocab + 7, generator=gen)
    view = wide[:, :vocab]
    want = view.clone()
    xgr.apply_token_bitmask_inplace(want, bitmask, vocab_size=vocab)
    apply_bitmask(view, bitmask)
    assert torch.equal(view, want)


@pytest.fixture(scope="module")
def llm(request) -> LLM:
    from tests.conftest import STORIES

    return LLM(str(STORIES), max_num_seqs=8, async_scheduling=False)


def _check(text: str, spec: GuidedDecoding) -> None:
    if spec.kind == GrammarKind.JSON_SCHEMA:
        jsonschema.validate(json.loads(text), SCHEMA)
    else:
        assert re.fullmatch(spec.source, text), text


def test_constrained_and_free_requests_in_one_batch(llm):
    prompts = ["Once upon a time", "Lily", "The dog", "Tom"]
    params = [
        SamplingParams(temperature=0, max_tokens=60, guided=JSON),
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=1.0, seed=7, max_tokens=60, guided=JSON),
        SamplingParams(temperature=0.8, seed=1, max_tokens=20, guided=REGEX),
    ]
    outs = llm.generate(prompts, params)
    for out, p in zip(outs, params, strict=True):
        o = out.outputs[0]
        if p.guided is None:
            assert o.finish_reason == "length"  # free: the story goes on
            continue
        assert o.finish_reason == "stop", o.text
        _check(o.text, p.guided)


def test_n_samples_each_follow_the_grammar(llm):
    (out,) = llm.generate(
        ["Once upon a time"], SamplingParams(n=4, temperature=1.0, max_tokens=60, guided=JSON)
    )
    assert len(out.outputs) == 4
    for o in out.outputs:
        _check(o.text, JSON)


def test_bad_grammar_fails_only_its_request(stories_path):
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    engine = EngineCore(EngineConfig(model=str(stories_path), max_num_seqs=4))
    bad = SamplingParams(max_tokens=8, guided=GuidedDecoding(GrammarKind.REGEX, "[a-"))
    assert engine.add_request(EngineRequest("bad", [1, 2, 3], bad)) is None
    assert (
        engine.add_request(EngineRequest("good", [1, 2, 3], SamplingParams(max_tokens=4))) is None
    )
    outputs = []
    for _ in range(200):
        outputs += engine.step()
        if not engine.has_unfinished_requests():
            break
    errors = [o for o in outputs if o.request_id == "bad"]
    assert len(errors) == 1 and errors[0].finish_reason == FinishReason.ERROR
    assert "invalid grammar" in errors[0].error and "[" in errors[0].error
    good = [t for o in outputs if o.request_id == "good" for t in o.new_token_ids]
    assert len(good) == 4


@pytest.mark.parametrize(
    "engine_args",
    [
        {"async_scheduling": True},
        {"speculative_method": "ngram", "num_speculative_tokens": 3},
        {"speculative_model": "stories", "num_speculative_tokens": 3},
    ],
    ids=["async", "ngram", "self-draft"],
)
def test_grammar_holds_under_async_scheduling_and_speculation(stories_path, engine_args, llm):
    if engine_args.get("speculative_model") == "stories":
        engine_args = {**engine_args, "speculative_model": str(stories_path)}
    engine = LLM(str(stories_path), max_num_seqs=8, **engine_args)
    prompts = ["Once upon a time", "Lily", "The dog", "Tom"]
    params = [
        SamplingParams(temperature=0, max_tokens=60, guided=JSON),
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=1.0, seed=3, max_tokens=60, guided=JSON),
        SamplingParams(temperature=0, max_tokens=20, guided=REGEX),
    ]
    outs = engine.generate(prompts, params)
    plain = llm.generate(prompts, params)
    for out, ref, p in zip(outs, plain, params, strict=True):
        if p.guided is not None:
            _check(out.outputs[0].text, p.guided)
        if p.temperature == 0:  # greedy: the same tokens as without async or speculation
            assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    # Async: constrained rows with a token in flight sampled only once it was applied.
    stepper = engine.engine.stepper  # None: speculative decoding steps synchronously
    assert (stepper is not None and stepper.num_deferred > 0) == ("async_scheduling" in engine_args)
    stats = engine.engine.spec_stats
    if "num_speculative_tokens" in engine_args:  # proposals were verified, some accepted
        assert stats.proposed > 0 and 0 < stats.accepted <= stats.proposed


def test_bench_structured_runs_on_cpu(stories_path, llama3_tokenizer_path, tmp_path, capsys):
    import argparse

    from headrace.bench.structured import add_args, structured_main

    p = argparse.ArgumentParser()
    add_args(p)
    out = tmp_path / "b.json"
    args = p.parse_args(
        ["--model", str(stories_path), "--tokenizer", str(llama3_tokenizer_path), "--device", "cpu"]
        + ["--num-requests", "2", "--output-len", "8", "--output-json", str(out)]
    )
    assert structured_main(args) == 0
    result = json.loads(out.read_text())
    assert result["constrained"]["output_tokens"] == result["free"]["output_tokens"] == 16
    assert "JSON schema" in capsys.readouterr().out


def test_speculative_rows_mask_after_each_proposal_and_roll_back(stories_path):
    from tokenizers import Tokenizer

    from worker.structured import GrammarBackend, RequestGrammar, grammar_bitmask

    tok = Tokenizer.from_file(str(stories_path / "tokenizer.json"))
    backend = GrammarBackend(str(stories_path), 512, [2])
    grammar = RequestGrammar(backend.submit(REGEX).result())
    good = [int(tok.token_to_id(p) or 0) for p in ["n", "o", ",", "▁", "1"]]  # "no, 1"

    def allowed(mask, row, token):
        return bool((int(mask[row, token // 32]) >> (token % 32)) & 1)

    mask = grammar_bitmask([(grammar, good)], 512, torch.device("cpu"))
    assert mask.shape[0] == 1 + len(good)
    for j, t in enumerate(good):
        assert allowed(mask, j, t)  # row j: after the first j proposals
    assert not allowed(mask, 0, good[1])  # the second token cannot come first
    again = grammar_bitmask([(grammar, [])], 512, torch.device("cpu"))
    assert torch.equal(again[0], mask[0])  # rolled back: the matcher is where it started
    bad = [good[0], good[0], good[1]]  # "nn": the second "n" is refused
    mask = grammar_bitmask([(None, [5]), (grammar, bad)], 512, torch.device("cpu"))
    assert (mask[:2] == -1).all()  # the free request's rows allow everything
    assert not allowed(mask, 3, good[0])
    assert torch.equal(mask[4], mask[3]) and torch.equal(mask[5], mask[3])
    backend.close()


def test_bounded_schema_always_closes_on_cpu(stories_path):
    """The CPU half of tests/gpu/test_gpu_structured.py's comparison: every constrained
    answer is complete JSON within max_tokens (an unbounded integer never closed)."""
    from tests.gpu.helpers import constrained_generation

    outs = constrained_generation(stories_path, "cpu")
    assert len(outs) == 3 and all(outs)
