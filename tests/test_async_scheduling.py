"""Async scheduling: the next decode step is launched before this one's tokens are read.

On CPU the same code path runs (eager model, token ids fed from the previous step's
sampled tensor), so outputs must equal the synchronous engine's exactly.
"""

from __future__ import annotations

import torch

from ipc.messages import EngineRequest, SamplingParams
from tests.test_golden import prompts_of_different_lengths
from tests.tiny_models import make_tiny_model
from worker.config import EngineConfig
from worker.engine import EngineCore


def run(path, params_list, prompts, abort_after=None, **engine_args):
    engine = EngineCore(EngineConfig(model=str(path), device="cpu", **engine_args))
    for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
        assert engine.add_request(EngineRequest(f"r{i}", prompt, params)) is None
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    lps: dict[str, list[float]] = {f"r{i}": [] for i in range(len(prompts))}
    finish: dict[str, str] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.request_id not in finish, "output after the request finished"
            tokens[o.request_id] += o.new_token_ids
            lps[o.request_id] += [lp.logprobs[0] for lp in o.new_logprobs or []]
            if o.finish_reason is not None:
                finish[o.request_id] = str(o.finish_reason)
        steps += 1
        if abort_after is not None and steps == abort_after[0]:
            engine.abort_requests([abort_after[1]])
            finish[abort_after[1]] = "abort"
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.kv.check_invariants()
    return tokens, lps, finish, engine


def test_greedy_and_seeded_outputs_equal_the_synchronous_engine(tmp_path, stories_path):
    path = make_tiny_model("llama", tmp_path / "m", stories_path)
    prompts = prompts_of_different_lengths()
    params = []
    for i in range(len(prompts)):
        if i % 3 == 0:  # seeded sampling: the step index must account for the token in flight
            params.append(
                SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=9 + i, logprobs=2)
            )
        else:
            params.append(SamplingParams(temperature=0, max_tokens=5 + 2 * i, logprobs=2))
    args = dict(block_size=4, max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks=40)
    sync = run(path, params, prompts, **args)
    asyn = run(path, params, prompts, async_scheduling=True, **args)
    assert asyn[0] == sync[0] and asyn[2] == sync[2]
    for rid in sync[1]:
        assert torch.allclose(torch.tensor(asyn[1][rid]), torch.tensor(sync[1][rid]), atol=1e-5)
    assert asyn[3].scheduler.num_preemptions == sync[3].scheduler.num_preemptions


def test_eos_stop_ids_and_aborts_drop_the_token_in_flight(stories_path):
    # stories260K ends stories with EOS (id 2): requests finish at unpredictable steps.
    prompts = [[1, 403, 407, 261, 378], [1, 317], [1, 403, 407], [1, 500, 17]]
    params = [SamplingParams(temperature=0, max_tokens=300) for _ in prompts]
    params[1] = SamplingParams(temperature=0, max_tokens=300, stop_token_ids=[400, 262])
    sync = run(stories_path, params, prompts, max_num_seqs=8)
    asyn = run(stories_path, params, prompts, max_num_seqs=8, async_scheduling=True)
    assert asyn[0] == sync[0] and asyn[2] == sync[2]
    assert "stop" in sync[2].values()
    # An abort while the next step is in flight: the request yields nothing more.
    sync = run(stories_path, params, prompts, abort_after=(6, "r0"), max_num_seqs=8)
    asyn = run(
        stories_path, params, prompts, abort_after=(6, "r0"), async_scheduling=True, max_num_seqs=8
    )
    assert asyn[2]["r0"] == "abort" and len(asyn[0]["r0"]) <= len(sync[0]["r0"]) + 1
    assert {k: v for k, v in asyn[0].items() if k != "r0"} == {
        k: v for k, v in sync[0].items() if k != "r0"
    }


def test_chaining_actually_happens(stories_path):
    engine = EngineCore(EngineConfig(model=str(stories_path), device="cpu", async_scheduling=True))
    engine.add_request(
        EngineRequest("a", [1, 403], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    )
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stepper is not None
    # Every step but the first is launched while the one before it runs.
    assert engine.stepper.num_steps == 20
    assert engine.stepper.num_overlapped == 19


def test_random_workloads_match_the_synchronous_engine(stories_path):
    """Random prompts, lengths, params, staggered arrivals and aborts: same outputs."""
    import random

    def workload(seed):
        rng = random.Random(seed)
        reqs = []
        for i in range(rng.randint(3, 8)):
            prompt = [1] + [rng.randrange(3, 512) for _ in range(rng.randint(1, 40))]
            greedy = rng.random() < 0.6
            params = SamplingParams(
                temperature=0 if greedy else 0.8,
                seed=None if greedy else rng.randrange(1000),
                max_tokens=rng.randint(1, 60),
                stop_token_ids=[rng.randrange(3, 512)] if rng.random() < 0.3 else [],
                presence_penalty=0.5 if rng.random() < 0.2 else 0.0,
                min_tokens=rng.randint(0, 3),
            )
            reqs.append((f"r{i}", prompt, params, rng.randint(0, 6)))
        aborts = {}
        if rng.random() < 0.5:  # abort one request some steps after it arrived
            rid, _, _, at = reqs[rng.randrange(len(reqs))]
            aborts[at + rng.randint(1, 25)] = rid
        blocks = rng.choice([None, 30])
        return reqs, aborts, blocks

    def drive(reqs, aborts, blocks, asyn):
        args = dict(device="cpu", block_size=4, max_num_seqs=4, async_scheduling=asyn)
        if blocks:
            args["num_gpu_blocks"] = blocks
        engine = EngineCore(EngineConfig(model=str(stories_path), **args))
        got: dict[str, list[int]] = {}
        done: dict[str, str] = {}
        step = 0
        while step < 400:
            for rid, prompt, params, at in reqs:
                if at == step:
                    assert engine.add_request(EngineRequest(rid, prompt, params)) is None
            if step in aborts and aborts[step] not in done:
                engine.abort_requests([aborts[step]])
                done[aborts[step]] = "abort"
            for o in engine.step():
                assert o.request_id not in done
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finish_reason is not None:
                    done[o.request_id] = str(o.finish_reason)
            step += 1
            if step > 7 and not engine.has_unfinished_requests():
                break
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
        return got, done

    for seed in range(8):
        reqs, aborts, blocks = workload(seed)
        sync = drive(reqs, aborts, blocks, False)
        asyn = drive(reqs, aborts, blocks, True)
        aborted = set(aborts.values())
        assert asyn[1] == sync[1], seed
        for rid, toks in sync[0].items():
            if rid in aborted:  # aborted between steps: at most the token in flight differs
                assert asyn[0].get(rid, [])[: len(toks)] == toks[: len(asyn[0].get(rid, []))]
            else:
                assert asyn[0][rid] == toks, (seed, rid)
