"""The persistent input batch gives exactly the rebuilt inputs (worker/persistent_batch.py).

Randomized schedules from the real scheduler and KV cache manager: arrivals, finishes,
aborts, preemption (a small cache), chunked prefill (a small token budget), speculative
proposals, prompt logprobs and KV compaction (a request's
table replaced by a shorter one, with a position offset).
"""

from __future__ import annotations

import random
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from ipc.messages import SamplingParams
from worker.config import SchedulerConfig
from worker.input_batch import HostInputs, build_host_inputs
from worker.kv_cache import KVCacheManager
from worker.persistent_batch import PersistentInputBatch, make_input_builder
from worker.request import Request, RequestStatus
from worker.scheduler import Scheduler, SchedulerOutput


def assert_same_inputs(a: HostInputs, b: HostInputs) -> None:
    for f in fields(HostInputs):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray), f.name
            assert x.dtype == y.dtype and x.shape == y.shape, (f.name, x.dtype, y.dtype)
            assert np.array_equal(x, y), f.name
        else:
            assert x == y and type(x) is type(y), (f.name, x, y)


def _new_request(rng: random.Random, i: int, room: int) -> Request:
    """A request of at most `room` tokens with its outputs (so the cache can hold it)."""
    prompt = [rng.randrange(1, 50) for _ in range(rng.randint(1, min(70, room - 30)))]
    params = SamplingParams(
        max_tokens=rng.randint(1, 30),
        prompt_logprobs=1 if rng.random() < 0.15 else None,
    )
    return Request(f"r{i}", prompt, params, frozenset({0}) if rng.random() < 0.5 else frozenset())


def _tokens(rng: random.Random, out: SchedulerOutput) -> list[list[int]]:
    """Fake sampled tokens: one per sampling request, plus some accepted proposals."""
    new = []
    for sr in out.scheduled:
        if not sr.samples:
            new.append([])
            continue
        accepted = rng.randint(0, sr.num_spec_tokens)
        new.append(sr.request.spec_token_ids[:accepted] + [rng.randrange(0, 50)])
    return new


def _compact_one(rng: random.Random, s: Scheduler, kv: KVCacheManager) -> None:
    """KV compaction of a running request whose prefill is done: a shorter table replaces
    its table, and new tokens go to cache index position - offset."""
    for req in s.running:
        rid = req.request_id
        done = req.num_computed_tokens
        if done >= 8 and not kv.tables[rid].offset and rng.random() < 0.5:
            kv.compact(rid, done, done // 2)
            return


@pytest.mark.parametrize("seed", range(6))
def test_persistent_batch_equals_the_rebuilt_inputs(seed: int) -> None:
    rng = random.Random(seed)
    k = rng.choice([0, 0, 2, 3])  # speculative proposals per request
    kv = KVCacheManager(rng.randint(12, 40), rng.choice([4, 16]), rng.random() < 0.5)
    config = SchedulerConfig(
        max_num_seqs=rng.randint(1, 8),
        max_num_batched_tokens=rng.randint(16, 64),
        max_model_len=128,
        num_lookahead_tokens=k,
    )
    s = Scheduler(config, kv)
    batch = PersistentInputBatch(small_batch=rng.choice([0, 0, 3]))  # 0: never rebuilt
    n_req = steps = decode_steps = 0
    while steps < 250:
        if n_req < 60 and rng.random() < 0.3:
            req = _new_request(rng, n_req, kv.num_blocks * kv.block_size - k)
            n_req += 1
            assert kv.can_fit(req.num_prompt_tokens + req.max_tokens + k)
            s.add_request(req)
        if s.running and rng.random() < 0.03:
            s.abort_requests([rng.choice(s.running).request_id])
        if rng.random() < 0.05:
            _compact_one(rng, s, kv)
        for req in s.running:
            if k and rng.random() < 0.5 and req.num_computed_tokens == req.num_tokens - 1:
                req.spec_token_ids = [rng.randrange(0, 50) for _ in range(rng.randint(0, k))]
        out = s.schedule()
        if out.empty:
            if not s.has_unfinished_requests() and n_req >= 60:
                break
            continue
        steps += 1
        assert_same_inputs(batch.build(out), build_host_inputs(out))
        decode_steps += all(sr.num_new_tokens == 1 for sr in out.scheduled)
        s.update(out, _tokens(rng, out))
    assert decode_steps > 10, "the fast path must be exercised"


def test_rows_are_updated_by_diffs_and_moved_on_a_finish() -> None:
    kv = KVCacheManager(64, 4, False)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), kv)
    for i in range(3):
        s.add_request(
            Request(f"r{i}", list(range(1, 7)), SamplingParams(max_tokens=10), frozenset())
        )
    batch = PersistentInputBatch(small_batch=0)
    out = s.schedule()
    batch.build(out)
    tables = list(batch.tables)
    s.update(out, [[7]] * 3)
    out = s.schedule()  # decode at position 6: same blocks (2 of 4 tokens each)
    batch.build(out)
    assert batch.tables == tables and batch.written == [2, 2, 2]
    s.update(out, [[7]] * 3)
    s.abort_requests(["r1"])
    out = s.schedule()  # r2 moves up one row, its table kept
    host = batch.build(out)
    assert batch.order == ["r0", "r2"] and batch.tables[1] is tables[2]
    assert host.block_tables.tolist() == [list(kv.block_table("r0")), list(kv.block_table("r2"))]
    assert_same_inputs(host, build_host_inputs(out))


def test_the_builder_is_chosen_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_INPUT_BATCH", "rebuild")
    assert make_input_builder() is build_host_inputs
    monkeypatch.delenv("HEADRACE_INPUT_BATCH")
    assert isinstance(make_input_builder().__self__, PersistentInputBatch)  # type: ignore[attr-defined]
    small = PersistentInputBatch()  # default: fewer than SMALL_BATCH rows are rebuilt
    kv = KVCacheManager(8, 4, False)
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8, max_model_len=16), kv)
    s.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=4), frozenset()))
    out = s.schedule()
    assert_same_inputs(small.build(out), build_host_inputs(out))
    assert small.order == []  # rebuilt: no row kept
    with pytest.raises(ValueError, match="HEADRACE_INPUT_BATCH must be one of"):
        make_input_builder("rows")
    assert RequestStatus.RUNNING  # the module's enums import cleanly beside the batch


def test_engine_outputs_are_the_same_with_either_builder(
    stories_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ipc.messages import EngineRequest
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    def run(mode: str) -> list[list[int]]:
        monkeypatch.setenv("HEADRACE_INPUT_BATCH", mode)
        engine = EngineCore(
            EngineConfig(model=str(stories_path), device="cpu", max_num_seqs=12, block_size=4)
        )
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        for i in range(10):  # 10 decoding rows: the vectorized path
            prompt = [(7 * i + j) % 400 + 3 for j in range(5 + 3 * i)]
            assert engine.add_request(EngineRequest(f"r{i}", prompt, params)) is None
        tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(10)}
        while engine.has_unfinished_requests():
            for o in engine.step():
                tokens[o.request_id] += o.new_token_ids
        return list(tokens.values())

    assert run("persistent") == run("rebuild")
