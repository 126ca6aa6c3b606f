"""Sampling rows kept across steps (worker/sampling_rows.py) give the rebuild's tokens.

The kept rows reuse their params' tensors while the rows stay the same and keep penalty
counts in a device pool updated from each step's new tokens; the rebuild turns every
row's params and whole token lists into tensors each step. Over randomized step
sequences (arrivals, finishes, reordering, several tokens at once as speculation gives,
ids past the vocabulary) both must give bit-identical distributions and tokens.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ipc.messages import SamplingParams
from tests.test_async_overlap import draw_workload, drive
from worker.request import Request, RequestStatus
from worker.sampler import Sampler, _splitmix64
from worker.sampling_rows import SamplingRows, make_sampling_rows, rebuilt_batch
from worker.sampling_tensors import splitmix64_np

EOS = 2
VOCAB = 97


def random_params(rng: random.Random) -> SamplingParams:
    greedy = rng.random() < 0.4
    return SamplingParams(
        temperature=0.0 if greedy else rng.choice([0.5, 1.0, 1.3]),
        top_p=rng.choice([1.0, 1.0, 0.8]),
        top_k=rng.choice([0, 0, 5, 200]),
        min_p=rng.choice([0.0, 0.0, 0.05]),
        seed=rng.choice([None, rng.randrange(-(2**40), 2**40)]),
        presence_penalty=rng.choice([0.0, 0.0, 0.7, -0.5]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.4]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
        min_tokens=rng.choice([0, 0, 3]),
        stop_token_ids=rng.choice([[], [7, 500]]),
        logprobs=rng.choice([None, None, 2]),
        max_tokens=1000,
    )


def new_request(rng: random.Random, rid: str) -> Request:
    # Ids past the vocabulary (embedding padding in real models) must be ignored.
    prompt = [rng.randrange(VOCAB + 3) for _ in range(rng.randint(1, 30))]
    return Request(rid, prompt, random_params(rng), frozenset({EOS}))


@pytest.mark.parametrize("seed", range(6))
def test_kept_rows_give_the_rebuilds_distributions_and_tokens(seed: int) -> None:
    check_kept_rows(seed, torch.device("cpu"))


def check_kept_rows(seed: int, device: torch.device) -> None:
    """40 random steps; also the GPU test's (tests/gpu/test_gpu_sampling_rows.py)."""
    rng = random.Random(seed)
    rows = SamplingRows(VOCAB, {EOS}, device)
    kept, rebuilt = Sampler(VOCAB, {EOS}, seed=seed), Sampler(VOCAB, {EOS}, seed=seed)
    live = [new_request(rng, f"r{i}") for i in range(rng.randint(1, 12))]
    gen = torch.Generator().manual_seed(seed)
    for step in range(40):
        if rng.random() < 0.2 and live:  # a request finishes (its slot is freed later)
            live.pop(rng.randrange(len(live))).status = RequestStatus.FINISHED
        if rng.random() < 0.25:
            live.insert(rng.randrange(len(live) + 1), new_request(rng, f"s{step}"))
        if rng.random() < 0.1:
            rng.shuffle(live)
        if not live:
            continue
        logits = (torch.randn(len(live), VOCAB + 5, generator=gen) * 3).to(device)  # padded
        a = rows.batch(live)
        b = rebuilt_batch(live, None, None)
        assert torch.equal(kept.processed_probs(logits, a), rebuilt.processed_probs(logits, b))
        ta, tb = kept(logits, a).token_ids, rebuilt(logits, b).token_ids
        assert torch.equal(ta, tb), step
        for req, t in zip(live, ta.tolist(), strict=True):
            for _ in range(rng.choice([1, 1, 1, 3])):  # speculation: several at once
                req.append_token(t if rng.random() < 0.7 else rng.randrange(VOCAB + 3))
    assert rows.num_layouts < 40  # some steps reused their rows


def test_a_steady_step_reuses_its_rows_and_finished_slots_are_freed() -> None:
    rng = random.Random(0)
    rows = SamplingRows(VOCAB, {EOS}, torch.device("cpu"))
    pen = SamplingParams(frequency_penalty=0.5, repetition_penalty=1.2, max_tokens=10)
    reqs = [Request(f"r{i}", [3, 4], pen, frozenset({EOS})) for i in range(3)]
    for _ in range(5):
        for r in reqs:
            r.append_token(rng.randrange(VOCAB))
        rows.batch(reqs)  # counts the tokens up to now
    assert rows.num_layouts == 1
    slot = rows.pool.slot_of["r0"]
    want = torch.bincount(torch.tensor(reqs[0].output_token_ids), minlength=VOCAB).float()
    assert torch.equal(rows.pool.counts[slot], want)
    seen = rows.pool.seen[slot].nonzero().flatten().tolist()
    assert seen == sorted(set(reqs[0].output_token_ids) | {3, 4})
    reqs[0].status = RequestStatus.FINISHED
    rows.batch(reqs[1:])
    assert "r0" not in rows.pool.slot_of and slot in rows.pool.free


def test_numpy_splitmix_matches_the_python_one() -> None:
    values = [0, 1, 2**63, 2**64 - 1, 12345678901234567, (-5) & (2**64 - 1)]
    got = splitmix64_np(np.array(values, dtype=np.uint64)).tolist()
    assert got == [_splitmix64(v) for v in values]


def test_unknown_mode_names_the_variable() -> None:
    with pytest.raises(ValueError, match="HEADRACE_SAMPLING_BATCH"):
        make_sampling_rows(VOCAB, {EOS}, torch.device("cpu"), mode="fast")
    assert make_sampling_rows(VOCAB, {EOS}, torch.device("cpu"), mode="rebuild") is None


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_tokens_equal_the_rebuilds_on_random_workloads(
    stories_path, monkeypatch, async_scheduling: bool
) -> None:
    for seed in range(4):
        w = draw_workload(seed)
        kept = drive(str(stories_path), w, async_scheduling)
        monkeypatch.setenv("HEADRACE_SAMPLING_BATCH", "rebuild")
        rebuilt = drive(str(stories_path), w, async_scheduling)
        monkeypatch.delenv("HEADRACE_SAMPLING_BATCH")
        assert kept.engine.runner.sampling_rows is not None
        assert rebuilt.engine.runner.sampling_rows is None
        assert kept.tokens == rebuilt.tokens, seed
        assert kept.finish == rebuilt.finish, seed
