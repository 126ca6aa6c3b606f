"""Async scheduling over whole workloads: the same tokens as the synchronous engine.

Async scheduling (worker/async_step.py) schedules step N+1 before step N's tokens are
known, admissions, finishes and preemptions included, so its schedules differ from a
synchronous engine's (a finished request holds its slot one step longer). What must not
differ is any request's tokens: greedy and seeded sampling depend only on the request.
Workloads are drawn from seeded random schedules: staggered arrivals, aborts (also aborts
at a token, as a gateway's stop string does), a tiny KV cache (preemption), chunked
prefill, penalties, min_tokens, stop ids, EOS, max_tokens, logprobs, prompt logprobs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from ipc.messages import EngineRequest, SamplingParams
from tests.tiny_models import make_tiny_model
from worker.config import EngineConfig
from worker.engine import EngineCore


@dataclass
class Workload:
    requests: list[tuple[str, list[int], SamplingParams, int]]  # id, prompt, params, arrival
    abort_at_step: dict[int, str] = field(default_factory=dict)
    abort_at_token: dict[str, int] = field(default_factory=dict)  # a "stop string": this id
    engine_args: dict = field(default_factory=dict)


def draw_workload(seed: int, vocab: int = 500) -> Workload:
    rng = random.Random(seed)
    reqs = []
    for i in range(rng.randint(4, 9)):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.choice([2, 5, 11, 23, 40]))]
        greedy = rng.random() < 0.5
        penalty = rng.random() < 0.3
        params = SamplingParams(
            temperature=0.0 if greedy else rng.choice([0.7, 1.0]),
            top_p=1.0 if greedy else rng.choice([1.0, 0.9]),
            seed=None if greedy else rng.randrange(10_000),
            max_tokens=(max_tokens := rng.randint(1, 28)),
            min_tokens=min(max_tokens, rng.choice([0, 0, 2, 5])),
            stop_token_ids=[rng.randrange(3, vocab)] if rng.random() < 0.3 else [],
            presence_penalty=0.6 if penalty and rng.random() < 0.5 else 0.0,
            frequency_penalty=0.4 if penalty and rng.random() < 0.5 else 0.0,
            repetition_penalty=1.3 if penalty and rng.random() < 0.5 else 1.0,
            logprobs=rng.choice([None, None, 0, 2]),
            prompt_logprobs=1 if rng.random() < 0.15 else None,
            ignore_eos=rng.random() < 0.3,
        )
        reqs.append((f"r{i}", prompt, params, rng.choice([0, 0, 1, 2, 3, 5, 8])))
    w = Workload(reqs)
    if rng.random() < 0.5:
        w.abort_at_step[rng.randint(1, 12)] = reqs[rng.randrange(len(reqs))][0]
    if rng.random() < 0.5:
        w.abort_at_token[reqs[rng.randrange(len(reqs))][0]] = rng.randrange(3, vocab)
    w.engine_args = dict(
        block_size=4,
        max_num_seqs=rng.choice([2, 4, 8]),
        max_num_batched_tokens=rng.choice([16, 32, 64]),
        num_gpu_blocks=rng.choice([18, 24, 40, 200]),  # small: preemptions
        enable_prefix_caching=rng.random() < 0.7,
    )
    return w


@dataclass
class Run:
    tokens: dict[str, list[int]]
    finish: dict[str, str]
    logprobs: dict[str, list[float]]
    prompt_logprobs: dict[str, list[float]]
    engine: EngineCore


def drive(
    path: str, w: Workload, async_scheduling: bool, device: str = "cpu", **extra: object
) -> Run:
    """Feed the workload by step count; an abort-at-token fires once that id comes out
    (what a gateway does for a stop string), so both engines abort after the same token."""
    config = EngineConfig(
        model=path, device=device, async_scheduling=async_scheduling, **w.engine_args, **extra
    )
    engine = EngineCore(config)
    run = Run({}, {}, {}, {}, engine)
    step = 0
    while step < 600:
        for rid, prompt, params, at in w.requests:
            if at == step:
                assert engine.add_request(EngineRequest(rid, prompt, params)) is None
        cut = w.abort_at_step.get(step)
        # Only once it has produced a token: before that there is nothing to compare.
        if cut is not None and cut not in run.finish and run.tokens.get(cut):
            engine.abort_requests([cut])
            run.finish[cut] = "abort"
        for o in engine.step():
            assert o.request_id not in run.finish, f"output after {o.request_id} finished"
            run.tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            run.logprobs.setdefault(o.request_id, []).extend(
                lp.logprobs[0] for lp in o.new_logprobs or []
            )
            if o.prompt_logprobs is not None:
                run.prompt_logprobs[o.request_id] = [
                    lp.logprobs[0] for lp in o.prompt_logprobs if lp is not None
                ]
            if o.finish_reason is not None:
                run.finish[o.request_id] = str(o.finish_reason)
            elif w.abort_at_token.get(o.request_id) in o.new_token_ids:
                engine.abort_requests([o.request_id])
                run.finish[o.request_id] = "abort"
        step += 1
        if step > 9 and not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests(), "workload did not finish"
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.kv.check_invariants()
    return run


def assert_same(sync: Run, asyn: Run, what: object, cut: tuple[str, ...] = ()) -> None:
    """The same outputs; requests in `cut` (aborted at a step count, which the async
    engine, a step behind in what it has returned, reaches with fewer tokens) a prefix."""
    for rid in cut:
        got, want = asyn.tokens.pop(rid, []), sync.tokens.pop(rid, [])
        n = min(len(got), len(want))
        assert got[:n] == want[:n], what
        if "abort" in (asyn.finish.get(rid), sync.finish.get(rid)):
            asyn.finish.pop(rid, None), sync.finish.pop(rid, None)  # either came first
    assert asyn.finish == sync.finish, what
    assert asyn.tokens == sync.tokens, what
    for rid, lps in sync.logprobs.items():
        n = min(len(lps), len(asyn.logprobs[rid]))
        assert torch.allclose(
            torch.tensor(asyn.logprobs[rid][:n]), torch.tensor(lps[:n]), atol=1e-4
        )
    assert asyn.prompt_logprobs.keys() == sync.prompt_logprobs.keys()
    for rid, lps in sync.prompt_logprobs.items():
        plp = torch.tensor(asyn.prompt_logprobs[rid])
        assert torch.allclose(plp, torch.tensor(lps), atol=1e-4), what


@pytest.mark.parametrize("seed", range(10))
def test_random_workloads_give_the_synchronous_tokens(stories_path, seed):
    w = draw_workload(seed)
    sync = drive(str(stories_path), w, False)
    asyn = drive(str(stories_path), w, True)
    assert_same(sync, asyn, (seed, w), cut=tuple(w.abort_at_step.values()))
    stepper = asyn.engine.stepper
    assert stepper is not None and stepper.num_overlapped > 0


def test_random_workloads_on_a_random_tiny_model(tmp_path, stories_path):
    """A tiny random Llama (other shapes, GQA) under the same kind of workloads."""
    path = str(make_tiny_model("llama", tmp_path / "m", stories_path))
    for seed in (100, 101, 102):
        w = draw_workload(seed)
        cut = tuple(w.abort_at_step.values())
        assert_same(drive(path, w, False), drive(path, w, True), seed, cut)


def test_admissions_finishes_and_preemptions_overlap(stories_path):
    """Steps that admit, finish or preempt are launched while the previous step runs;
    the step after a finish drops the finished request's token."""
    w = Workload(
        [
            (
                f"r{i}",
                [1, 403 + i, 407, 261],
                SamplingParams(temperature=0, max_tokens=4 + 3 * i),
                i,
            )
            for i in range(6)
        ],
        engine_args=dict(block_size=4, max_num_seqs=3, num_gpu_blocks=9),
    )
    sync = drive(str(stories_path), w, False)
    asyn = drive(str(stories_path), w, True)
    assert_same(sync, asyn, "staggered")
    stepper = asyn.engine.stepper
    assert stepper is not None
    assert asyn.engine.scheduler.num_preemptions > 0
    # Only the very first step (nothing in flight) is launched without overlap.
    assert stepper.num_overlapped == stepper.num_steps - 1


def test_penalties_and_min_tokens_wait_for_the_token_in_flight(stories_path):
    """Sampling that reads generated tokens is deferred, not wrong; greedy rows are not."""
    pen = SamplingParams(temperature=0, max_tokens=20, frequency_penalty=1.5, min_tokens=6)
    plain = SamplingParams(temperature=0, max_tokens=20)
    w = Workload([("pen", [1, 403, 407], pen, 0), ("plain", [1, 317], plain, 0)])
    sync = drive(str(stories_path), w, False)
    asyn = drive(str(stories_path), w, True)
    assert_same(sync, asyn, "penalties")
    stepper = asyn.engine.stepper
    assert stepper is not None and stepper.num_deferred >= 15
    w = Workload([("plain", [1, 317], plain, 0)])
    asyn = drive(str(stories_path), w, True)
    assert asyn.engine.stepper is not None and asyn.engine.stepper.num_deferred == 0


def test_speculative_decoding_steps_synchronously(stories_path):
    """n-gram speculation: the async flag leaves every step synchronous (the proposals
    need the previous step's tokens), with the same tokens."""
    w = draw_workload(7)
    spec = dict(speculative_method="ngram", num_speculative_tokens=3)
    base = drive(str(stories_path), w, False)
    sync = drive(str(stories_path), w, False, **spec)
    asyn = drive(str(stories_path), w, True, **spec)
    assert asyn.engine.stepper is None
    assert_same(sync, asyn, "ngram")  # the same engine path: exactly the same
    aborted = {*w.abort_at_step.values(), *w.abort_at_token}  # speculation: other cut points
    greedy = {r for r, _, p, _ in w.requests if p.temperature == 0 and r not in aborted}
    assert {r: t for r, t in asyn.tokens.items() if r in greedy} == {
        r: t for r, t in base.tokens.items() if r in greedy
    }
