"""The batched sampler: penalties by hand, filtering by counting draws, seeds by reshuffling."""

from __future__ import annotations

import math
import random

import msgspec
import numpy as np
import pytest
import torch
from scipy import stats

from ipc.messages import SamplingParams
from worker.sampler import (
    Sampler,
    SamplingBatch,
    compute_logprobs,
    seeded_exponential,
)

EOS = 2


def make_batch(
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch(
        params=params,
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(n)],
        output_token_ids=outputs if outputs is not None else [[] for _ in range(n)],
    )


def sample(logits: list[list[float]] | torch.Tensor, batch: SamplingBatch, **kw: int) -> list[int]:
    x = torch.as_tensor(logits, dtype=torch.float32)
    sampler = Sampler(vocab_size=kw.get("vocab", x.shape[1]), eos_token_ids={EOS})
    return sampler(x, batch).token_ids.tolist()


GREEDY = SamplingParams(temperature=0.0)


# --- greedy and penalties -------------------------------------------------------------------


def test_greedy_rows_take_argmax_in_a_mixed_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    params = [GREEDY, SamplingParams(temperature=1.0), GREEDY] * 2
    out = Sampler(50, {EOS})(logits, make_batch(params)).token_ids
    assert out.dtype == torch.int64 and out.shape == (6,)
    argmax = logits.argmax(dim=-1)
    for i in (0, 2, 3, 5):
        assert out[i] == argmax[i]


def test_sampler_leaves_the_callers_logits_alone() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5]])
    before = logits.clone()
    params = [SamplingParams(temperature=0.5, top_k=2, repetition_penalty=2.0, min_tokens=1)]
    Sampler(4, {EOS})(logits, make_batch(params, [[0]], [[]]))
    assert torch.equal(logits, before)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    # Token 0 (prompt) 3.0 -> 1.5 < 2.0: token 1 wins.
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample([[3.0, 2.0, 0.0]], make_batch([p], [[0]], [[]])) == [1]
    # Without the penalty token 0 wins; penalizing an unseen token changes nothing.
    assert sample([[3.0, 2.0, 0.0]], make_batch([GREEDY], [[0]], [[]])) == [0]
    assert sample([[3.0, 2.0, 0.0]], make_batch([p], [[2]], [[2]])) == [0]
    # Token 0 (output) -1.0 -> -2.0 < -1.5: token 1 wins.
    assert sample([[-1.0, -1.5, -9.0]], make_batch([p], [[]], [[0]])) == [1]
    # A penalty < 1 rewards: -1.6 * 0.5 = -0.8 > -1.0.
    reward = SamplingParams(temperature=0.0, repetition_penalty=0.5)
    assert sample([[-1.0, -1.6, -9.0]], make_batch([reward], [[1]], [[]])) == [1]


def test_frequency_and_presence_penalties_follow_openai_formula() -> None:
    logits = [[1.0, 0.8, 0.0]]
    out = [[0, 0]]  # token 0 generated twice
    # 1.0 - 0.3 * 2 = 0.4 < 0.8
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.3)
    assert sample(logits, make_batch([freq], [[]], out)) == [1]
    # 1.0 - 0.05 * 2 = 0.9 > 0.8
    weak = SamplingParams(temperature=0.0, frequency_penalty=0.05)
    assert sample(logits, make_batch([weak], [[]], out)) == [0]
    # presence counts once: 1.0 - 0.15 = 0.85 > 0.8, but 1.0 - 0.25 = 0.75 < 0.8
    pres = SamplingParams(temperature=0.0, presence_penalty=0.15)
    assert sample(logits, make_batch([pres], [[]], out)) == [0]
    pres = SamplingParams(temperature=0.0, presence_penalty=0.25)
    assert sample(logits, make_batch([pres], [[]], out)) == [1]
    # both: 1.0 - 0.05 * 2 - 0.15 = 0.75 < 0.8
    both = SamplingParams(temperature=0.0, frequency_penalty=0.05, presence_penalty=0.15)
    assert sample(logits, make_batch([both], [[]], out)) == [1]
    # prompt tokens are not penalized by frequency / presence
    assert sample(logits, make_batch([freq], [[0, 0, 0]], [[]])) == [0]
    # negative penalties encourage repeats: 0.8 + 0.3 * 1 = 1.1 > 1.0
    neg = SamplingParams(temperature=0.0, frequency_penalty=-0.3)
    assert sample(logits, make_batch([neg], [[]], [[1]])) == [1]


def test_penalties_apply_per_row() -> None:
    logits = [[1.0, 0.8, 0.0]] * 3
    params = [
        SamplingParams(temperature=0.0, frequency_penalty=0.3),
        GREEDY,
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
    ]
    # row 1 saw token 0 too, but asks for no penalty; row 2: 1.0 / 1.5 = 0.67 < 0.8
    assert sample(logits, make_batch(params, [[], [], [0]], [[0, 0], [0, 0], []])) == [1, 0, 1]


def test_min_tokens_suppresses_eos_and_stop_ids_then_stops() -> None:
    logits = [[0.0, 1.0, 9.0, 8.0, 2.0]]  # EOS (2) first, stop id 3 second
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    assert sample(logits, make_batch([p], [[]], [[]])) == [4]
    assert sample(logits, make_batch([p], [[]], [[4]])) == [4]
    assert sample(logits, make_batch([p], [[]], [[4, 4]])) == [EOS]
    # a stop id outside the vocabulary is ignored, not an error
    far = SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[3, 10_000])
    assert sample(logits, make_batch([far], [[]], [[]])) == [4]
    # random rows never draw them either
    hot = SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[3])
    draws = sample(torch.tensor(logits).expand(500, 5), make_batch([hot] * 500))
    assert EOS not in draws and 3 not in draws


def test_padding_columns_past_the_vocabulary_are_never_sampled() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.5, 50.0]]).expand(200, 4)
    params = [GREEDY] + [SamplingParams(temperature=2.0)] * 199
    out = sample(logits, make_batch(params), vocab=3)
    assert max(out) < 3 and out[0] == 1


# --- seeds --------------------------------------------------------------------------------


def test_seeded_row_is_reproducible_whatever_its_neighbours_and_position() -> None:
    vocab = 64
    gen = torch.Generator().manual_seed(1)
    target_logits = torch.randn(vocab, generator=gen)
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    rng = random.Random(0)
    for step in range(20):
        history = [rng.randrange(vocab) for _ in range(step)]
        seen: set[int] = set()
        for trial in range(4):
            # different neighbours each time: unseeded, seeded with other seeds, greedy
            n_other = rng.randrange(0, 6)
            others = [
                SamplingParams(temperature=1.0, seed=rng.choice([None, 1, 1234 + trial + 1]))
                for _ in range(n_other)
            ]
            params = [target, *others]
            outs = [history] + [[rng.randrange(vocab)] * rng.randrange(9) for _ in others]
            rows = [target_logits] + [torch.randn(vocab, generator=gen) for _ in others]
            order = list(range(len(params)))
            rng.shuffle(order)
            batch = make_batch(
                [params[i] for i in order], [[] for _ in order], [outs[i] for i in order]
            )
            sampler = Sampler(vocab, {EOS}, seed=trial)  # unseeded rows differ per trial
            tokens = sampler(torch.stack([rows[i] for i in order]), batch).token_ids
            seen.add(int(tokens[order.index(0)]))
        assert len(seen) == 1, f"step {step}: seeded row drew {seen}"


def test_seeded_tokens_vary_with_step_and_seed() -> None:
    logits = torch.zeros(1, 1000)  # uniform: any fixed point would show at once
    sampler = Sampler(1000, {EOS})

    def run(seed: int) -> list[int]:
        p = SamplingParams(seed=seed)
        return [int(sampler(logits, make_batch([p], [[]], [[7] * s])).token_ids) for s in range(30)]

    a, b = run(5), run(6)
    assert run(5) == a
    assert len(set(a)) > 25 and a != b
    # seeds follow the full 64-bit range the validator allows
    # the validator allows any 64-bit seed, signed or not; -1 and 2**64 - 1 share their bits
    assert run(-1) == run(2**64 - 1) != run(2**63)


def test_seeded_noise_is_exponential() -> None:
    q = seeded_exponential(list(range(200)), 500, torch.device("cpu"))
    assert q.shape == (200, 500) and bool((q > 0).all())
    u = torch.exp(-q).flatten().numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # rows with neighbouring keys are not correlated
    assert abs(np.corrcoef(u[:-500], u[500:])[0, 1]) < 0.01


# --- filtering, counted over many draws ---------------------------------------------------

PROBS = np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02])
LOGITS = np.log(PROBS)
N_DRAWS = 2000


def reference(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """vLLM v1 order by a different route: temperature, min_p, top_k, top_p; ties kept."""
    probs = np.exp(logits / p.temperature - np.max(logits / p.temperature))
    probs /= probs.sum()
    keep = probs >= p.min_p * probs.max()
    if p.top_k > 0:
        keep &= probs >= np.sort(probs[keep])[::-1][min(p.top_k, keep.sum()) - 1]
    if p.top_p < 1:
        kept = np.where(keep, probs, 0.0) / np.where(keep, probs, 0.0).sum()
        order = np.argsort(-kept, kind="stable")
        before = np.cumsum(kept[order]) - kept[order]
        last = order[before < p.top_p][-1]
        keep &= kept >= kept[last]
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


CASES = [
    (SamplingParams(top_k=3), {0, 1, 2}),
    (SamplingParams(top_p=0.7), {0, 1, 2, 3}),  # 0.65 before token 3 < 0.7
    (SamplingParams(min_p=0.3), {0, 1, 2, 3, 4}),  # p >= 0.09
    (SamplingParams(temperature=0.7, top_k=5, top_p=0.8), {0, 1, 2}),
    (SamplingParams(temperature=1.5, min_p=0.2, top_p=0.9), {0, 1, 2, 3, 4, 5}),
    (SamplingParams(temperature=2.0), set(range(8))),
]


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize(("params", "expected"), CASES)
def test_filtered_draws_match_the_renormalized_distribution(
    params: SamplingParams, expected: set[int], seeded: bool
) -> None:
    ref = reference(LOGITS, params)
    assert set(np.flatnonzero(ref)) == expected  # the reference agrees with the hand count
    if seeded:  # one request, 2000 steps: exercises the hash noise
        rows = [msgspec.structs.replace(params, seed=99)] * N_DRAWS
        outputs = [[0] * s for s in range(N_DRAWS)]
    else:
        rows, outputs = [params] * N_DRAWS, [[] for _ in range(N_DRAWS)]
    logits = torch.tensor(LOGITS, dtype=torch.float32).expand(N_DRAWS, 8)
    sampler = Sampler(8, eos_token_ids=set(), seed=3)
    tokens = sampler(logits, make_batch(rows, [[] for _ in rows], outputs)).token_ids
    counts = np.bincount(tokens.numpy(), minlength=8)
    assert set(np.flatnonzero(counts)) == expected  # nothing outside, everything inside
    kept = sorted(expected)
    _, pvalue = stats.chisquare(counts[kept], ref[kept] * N_DRAWS)
    assert pvalue > 1e-3, (counts, ref * N_DRAWS)


def test_filters_hold_per_row_on_a_large_random_vocabulary() -> None:
    # A top_k row beside top_p rows goes through the sort path with top_p = 1 ("off"): it
    # must still keep its k tokens and no more.
    vocab, n = 1000, 300
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(4)) * 2
    kinds = [
        SamplingParams(top_k=3, seed=-3),
        SamplingParams(top_p=0.5),
        SamplingParams(top_k=20, top_p=0.8, temperature=0.7),
        SamplingParams(min_p=0.1, top_k=50),
    ]
    params = (kinds * n)[:n]
    tokens = sample(logits, make_batch(params))
    for i, (p, t) in enumerate(zip(params, tokens, strict=True)):
        assert reference(logits[i].double().numpy(), p)[t] > 0, (i, p)


def test_min_p_applies_before_top_p() -> None:
    # min_p 0.5 keeps {0, 1} -> [0.625, 0.375]; top_p 0.6 then keeps token 0 alone.
    # (top_p first would keep {0, 1}.)
    logits = torch.tensor(np.log([0.5, 0.3, 0.2]), dtype=torch.float32).expand(300, 3)
    p = SamplingParams(min_p=0.5, top_p=0.6)
    assert set(sample(logits, make_batch([p] * 300))) == {0}


def test_top_k_keeps_every_token_tied_at_the_boundary() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0, -1.0]]).expand(600, 5)
    for params in (SamplingParams(top_k=2), SamplingParams(top_k=2, top_p=0.99)):
        assert set(sample(logits, make_batch([params] * 600))) == {0, 1, 2}


def test_rows_with_different_filters_share_a_batch() -> None:
    logits = torch.tensor(LOGITS, dtype=torch.float32).expand(3 * 400, 8)
    params = [SamplingParams(top_k=1), SamplingParams(top_p=0.45), SamplingParams(min_p=0.9)]
    out = np.array(sample(logits, make_batch(params * 400))).reshape(400, 3)
    assert set(out[:, 0]) == {0}
    assert set(out[:, 1]) == {0, 1}  # 0.30 before token 1 < 0.45
    assert set(out[:, 2]) == {0}


# --- logprobs -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_of_the_raw_distribution(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(5, 40, generator=gen) * 3).to(dtype)
    params = [
        SamplingParams(logprobs=3, temperature=0.5, repetition_penalty=1.8),
        SamplingParams(logprobs=0),
        SamplingParams(),  # asks for none: still gets a row, trimmed by the caller
        SamplingParams(logprobs=5, temperature=0.0, top_k=2, frequency_penalty=1.0),
        SamplingParams(logprobs=1, min_p=0.2, top_p=0.5),
    ]
    prompts = [[1, 2, 3]] * 5
    outputs = [[4, 4], [], [], [5, 6], [7]]
    out = Sampler(40, {EOS})(logits, make_batch(params, prompts, outputs))
    lp = out.logprobs
    assert lp is not None
    assert lp.token_ids.shape == (5, 6) and lp.logprobs.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert torch.equal(lp.token_ids[:, 0], out.token_ids)
    torch.testing.assert_close(lp.logprobs, expected.gather(1, lp.token_ids))
    top = lp.logprobs[:, 1:]
    assert bool((top[:, :-1] >= top[:, 1:]).all())  # sorted descending
    assert torch.equal(top[:, 0], expected.max(dim=-1).values)
    for i in range(5):
        order = expected[i].argsort(descending=True).tolist()
        assert lp.ranks[i] == order.index(int(out.token_ids[i])) + 1
    rows = lp.to_lists([3, 0, 0, 5, 1])
    assert [len(r.token_ids) for r in rows] == [4, 1, 1, 6, 2]
    assert rows[3].token_ids[0] == out.token_ids[3] and rows[3].rank == lp.ranks[3]
    assert rows[0].logprobs == pytest.approx(lp.logprobs[0, :4].tolist())


def test_no_logprobs_tensors_when_nobody_asks() -> None:
    out = Sampler(10, {EOS})(torch.randn(3, 10), make_batch([SamplingParams()] * 3))
    assert out.logprobs is None


def test_compute_logprobs_ranks_and_ties() -> None:
    logits = torch.tensor([[2.0, 1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    lp = compute_logprobs(logits, torch.tensor([3, 1]), num_top=2)
    assert lp.ranks.tolist() == [4, 4]  # ties rank the token last among equals
    assert lp.token_ids[0].tolist() == [3, 0, 1] or lp.token_ids[0].tolist() == [3, 0, 2]
    torch.testing.assert_close(lp.logprobs[1], torch.full((3,), -math.log(4)))
    none = compute_logprobs(logits, torch.tensor([0, 0]), num_top=0)
    assert none.token_ids.shape == (2, 1) and none.ranks.tolist() == [1, 4]


# --- on the GPU ---------------------------------------------------------------------------

ALL_FEATURES = [
    SamplingParams(temperature=0.0, logprobs=2),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=7, repetition_penalty=1.3),
    SamplingParams(temperature=1.2, min_p=0.05, frequency_penalty=0.5, presence_penalty=0.2),
    SamplingParams(top_k=3, min_tokens=4, stop_token_ids=[5], logprobs=4, seed=-3),
    SamplingParams(top_p=0.5, seed=2**63),
]


def _all_features_batch(n: int) -> SamplingBatch:
    params = ALL_FEATURES * n
    prompts = [[1, 2, 3, 2]] * len(params)
    outputs = [[i % 7, 4, 4] for i in range(len(params))]
    return make_batch(params, prompts, outputs)


@pytest.mark.gpu
def test_cuda_sampling_never_syncs_with_the_host() -> None:
    logits = torch.randn(20, 32000, device="cuda", dtype=torch.bfloat16)
    sampler = Sampler(32000, {EOS})
    batch = _all_features_batch(4)
    sampler(logits, batch)  # warm up: allocator, generator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.token_ids.device.type == "cuda" and out.logprobs is not None


@pytest.mark.gpu
def test_seeded_rows_draw_the_same_tokens_on_cpu_and_cuda() -> None:
    logits = torch.randn(25, 1000, generator=torch.Generator().manual_seed(4))
    batch = _all_features_batch(5)
    cpu = Sampler(1000, {EOS})(logits, batch).token_ids
    gpu = Sampler(1000, {EOS})(logits.cuda(), batch).token_ids.cpu()
    seeded = [i for i, p in enumerate(batch.params) if p.seed is not None or p.greedy]
    assert torch.equal(cpu[seeded], gpu[seeded])
