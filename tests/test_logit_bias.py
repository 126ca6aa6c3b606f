"""logit_bias (OpenAI's) and allowed_token_ids (vLLM's): validation, the sampler, the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ipc.messages import SamplingParams
from ipc.sampling import ParamError, check_request
from worker.sampler import Sampler, SamplingBatch, plain_greedy

V = 50
EOS = 0


def _batch(params: list[SamplingParams]) -> SamplingBatch:
    n = len(params)
    return SamplingBatch(params, [[1, 2]] * n, [[]] * n)


def test_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101.0}).validate()
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0}).validate()
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: float("nan")}).validate()
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[]).validate()
    for params, field in [
        (SamplingParams(logit_bias={V: 1.0}), "logit_bias"),
        (SamplingParams(allowed_token_ids=[1, V + 3]), "allowed_token_ids"),
    ]:
        with pytest.raises(ParamError) as e:
            check_request([1, 2], params, V, 64, 20)
        assert e.value.field == field and "out of vocabulary" in str(e.value)
    check_request([1], SamplingParams(logit_bias={V - 1: -100.0}, allowed_token_ids=[0]), V, 64, 20)


def test_biased_rows_are_not_plain_greedy() -> None:
    assert plain_greedy(SamplingParams(temperature=0), 0)
    assert not plain_greedy(SamplingParams(temperature=0, logit_bias={3: 1.0}), 0)
    assert not plain_greedy(SamplingParams(temperature=0, allowed_token_ids=[3]), 0)


def test_greedy_rows_take_the_argmax_of_the_biased_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, V, generator=gen)
    top = logits.argmax(dim=-1)
    forced = int((top[0] + 7) % V)
    params = [
        SamplingParams(temperature=0, logit_bias={forced: 100.0}),
        SamplingParams(temperature=0, logit_bias={int(top[1]): -100.0}),
        SamplingParams(temperature=0),  # a plain row beside them: untouched
        SamplingParams(temperature=0, logit_bias={3: 0.5, 9: -0.25, 11: 2.0}),
        SamplingParams(temperature=0, allowed_token_ids=[4, 8, 15]),
    ]
    out = Sampler(V, {EOS})(logits.clone(), _batch(params)).token_ids.tolist()
    assert out[0] == forced
    biased = logits[1].clone()
    biased[int(top[1])] -= 100.0
    assert out[1] == int(biased.argmax()) != int(top[1])
    assert out[2] == int(top[2])
    row3 = logits[3].clone()
    row3[3] += 0.5
    row3[9] -= 0.25
    row3[11] += 2.0
    assert out[3] == int(row3.argmax())
    assert out[4] == [4, 8, 15][int(logits[4, [4, 8, 15]].argmax())]


def test_sampled_rows_draw_only_allowed_tokens_and_banned_tokens_never() -> None:
    logits = torch.zeros(64, V)  # uniform: every token as likely
    banned = {t: -100.0 for t in range(V // 2)}
    params = [
        SamplingParams(temperature=1.0, seed=i, allowed_token_ids=[5, 6, 7])
        if i % 2
        else SamplingParams(temperature=1.0, seed=i, logit_bias=banned)
        for i in range(64)
    ]
    out = Sampler(V, {EOS})(logits, _batch(params)).token_ids.tolist()
    for i, t in enumerate(out):
        assert (t in (5, 6, 7)) if i % 2 else (t >= V // 2), (i, t)
    assert len(set(out[1::2])) > 1 and len(set(out[0::2])) > 1  # still random draws


def test_engine_follows_the_bias_and_leaves_other_requests_alone(stories_path: Path) -> None:
    from headrace.llm import LLM

    llm = LLM(str(stories_path), device="cpu")
    try:
        prompt = [1, 403, 407, 261, 378]
        plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        alone = llm.generate([prompt], plain)[0].outputs[0].token_ids
        forced = SamplingParams(
            temperature=0, max_tokens=8, ignore_eos=True, logit_bias={300: 100.0}
        )
        allowed = SamplingParams(
            temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, allowed_token_ids=[50, 60]
        )
        res = llm.generate([prompt, prompt, prompt], [forced, plain, allowed])
        assert res[0].outputs[0].token_ids == [300] * 8
        assert res[1].outputs[0].token_ids == alone
        assert set(res[2].outputs[0].token_ids) <= {50, 60}
    finally:
        llm.close()
