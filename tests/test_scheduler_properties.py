"""Property tests: scheduler + KV cache manager under random load, with a fake model.

Random arrivals, prompt lengths, shared prefixes, output lengths and aborts, with so few
blocks that preemption happens. After every step the manager's invariants hold (reference
counts equal block-table membership, free queue consistent); every request ends; at the
end every block is free again. With KV compression on, prefills that end compact their
tables (the real KVCompressor, StreamingLLM's choice on a tiny cache): the accounting stays
exact, compacted blocks are never in the prefix cache, preempted requests recompress.
"""

from __future__ import annotations

import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc.messages import SamplingParams
from worker.config import SchedulerConfig
from worker.kv_cache import KVCacheManager
from worker.kv_compaction import KVCompressor
from worker.kv_compression import KVCompressionSettings
from worker.request import Request, RequestStatus
from worker.scheduler import Scheduler


def fake_tokens(sched_out, rng: random.Random) -> list[list[int]]:
    """A 'model': one token per sampling request (with speculation: accept a random prefix)."""
    out = []
    for sr in sched_out.scheduled:
        if not sr.samples:
            out.append([])
            continue
        accepted = rng.randint(0, sr.num_spec_tokens)
        out.append([rng.randrange(3, 50) for _ in range(accepted + 1)])
    return out


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    num_blocks = draw(st.integers(8, 40))
    max_len = num_blocks * block_size  # so every request can fit alone
    n = draw(st.integers(1, 14))
    prefixes = [draw(st.lists(st.integers(3, 50), min_size=1, max_size=20)) for _ in range(3)]
    reqs = []
    for i in range(n):
        prefix = prefixes[draw(st.integers(0, 2))] if draw(st.booleans()) else []
        tail = draw(st.lists(st.integers(3, 50), min_size=1, max_size=30))
        prompt = (prefix + tail)[: max_len - 1]
        max_tokens = draw(st.integers(1, max(1, min(20, max_len - len(prompt)))))
        arrival = draw(st.integers(0, 10))
        abort_at = draw(st.one_of(st.none(), st.integers(0, 30)))
        reqs.append((f"r{i}", prompt, max_tokens, arrival, abort_at))
    return dict(
        block_size=block_size,
        num_blocks=num_blocks,
        max_len=max_len,
        max_num_seqs=draw(st.integers(1, 8)),
        budget=draw(st.integers(1, 64)),
        caching=draw(st.booleans()),
        spec=draw(st.integers(0, 3)),
        compress=draw(st.one_of(st.none(), st.sampled_from([0.3, 0.5, 6, 9]))),
        min_prompt_len=draw(st.integers(0, 12)),
        reqs=reqs,
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_end_and_free_everything(w):
    rng = random.Random(w["seed"])
    kv = KVCacheManager(w["num_blocks"], w["block_size"], enable_caching=w["caching"])
    sched = Scheduler(
        SchedulerConfig(
            max_num_seqs=w["max_num_seqs"],
            max_num_batched_tokens=w["budget"],
            max_model_len=w["max_len"],
            num_lookahead_tokens=w["spec"],
        ),
        kv,
    )
    compressor = KVCompressor(num_layers=2, head_dim=2)
    caches = [torch.zeros(2, w["num_blocks"], w["block_size"], 1, 2) for _ in range(2)]
    settings = None
    if w["compress"] is not None:
        settings = KVCompressionSettings("streaming", w["compress"], 2, w["min_prompt_len"])
    pending = sorted(w["reqs"], key=lambda r: r[3])
    live: dict[str, Request] = {}
    finished: set[str] = set()
    step = 0
    while pending or sched.has_unfinished_requests():
        while pending and pending[0][3] <= step:
            rid, prompt, max_tokens, _, abort_at = pending.pop(0)
            # Admission rule: prompt + max_tokens (+ lookahead) must fit the whole cache.
            if not kv.can_fit(len(prompt) + max_tokens + w["spec"]):
                continue
            req = Request(rid, prompt, SamplingParams(max_tokens=max_tokens), frozenset({2}))
            req.abort_at = abort_at  # type: ignore[attr-defined]
            req.kv_compression, req.kv_compression_pending = settings, settings is not None
            sched.add_request(req)
            live[rid] = req
        for req in list(live.values()):
            if req.abort_at is not None and req.abort_at == step and not req.is_finished:  # type: ignore[attr-defined]
                sched.abort_requests([req.request_id])
        # Speculative proposals for running decodes, to exercise lookahead slots.
        if w["spec"]:
            for req in sched.running:
                if req.num_computed_tokens == req.num_tokens - 1 and rng.random() < 0.5:
                    req.spec_token_ids = [rng.randrange(3, 50) for _ in range(w["spec"])]
        out = sched.schedule()
        assert out.num_batched_tokens <= w["budget"]
        assert len(sched.running) <= w["max_num_seqs"]
        for sr in out.scheduled:
            assert sr.request.status == RequestStatus.RUNNING
            # every scheduled token has a slot in the request's blocks
            held = len(kv.block_ids(sr.request.request_id)) * w["block_size"]
            assert held >= sr.end - sr.kv_offset
        ending = compressor.prefills_ending(out)
        sched.update(out, fake_tokens(out, rng))
        compressor.compress(ending, kv, caches)
        kv.check_invariants()
        for table in kv.tables.values():
            if table.offset:  # compacted: never in the prefix cache
                assert all(b.hash is None for b in table.blocks)
                assert len(table) >= kv.blocks_needed(1)
        for rid, req in live.items():
            if req.is_finished:
                finished.add(rid)
            assert req.num_output_tokens <= req.max_tokens
            assert req.num_tokens <= w["max_len"]
        step += 1
        assert step < 5000, "scheduler made no progress"
    assert finished == set(live)
    assert kv.num_free_blocks == kv.num_blocks
    kv.check_invariants()
    assert not compressor.windows
    if settings is None:
        assert compressor.stats.requests == 0


def test_preempts_newest_running_request():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=False)
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=8), kv
    )
    a = Request("a", [5, 6, 7], SamplingParams(max_tokens=4), frozenset())
    b = Request("b", [5, 6, 7], SamplingParams(max_tokens=4), frozenset())
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()  # both prefills: 2 blocks each, cache full
    assert [sr.request.request_id for sr in out.scheduled] == ["a", "b"]
    sched.update(out, [[10], [10]])  # 4 tokens each: still fits in 2 blocks
    out = sched.schedule()
    sched.update(out, [[11], [11]])  # now 5 tokens each: the 5th needs a third block
    out = sched.schedule()
    assert out.preempted == ["b"]  # the newer one goes
    assert [sr.request.request_id for sr in out.scheduled] == ["a"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert sched.waiting[0] is b
    kv.check_invariants()


def test_chunked_prefill_respects_budget():
    kv = KVCacheManager(num_blocks=64, block_size=4, enable_caching=False)
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10, max_model_len=256), kv
    )
    req = Request("a", list(range(3, 28)), SamplingParams(max_tokens=2), frozenset())
    sched.add_request(req)
    chunks = []
    while not req.is_finished:
        out = sched.schedule()
        chunks.append(out.scheduled[0].num_new_tokens)
        sched.update(out, [[1] if sr.samples else [] for sr in out.scheduled])
    assert chunks == [10, 10, 5, 1]


def test_preempted_compressed_request_recomputes_and_recompresses():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_caching=True)
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=20), kv
    )
    compressor = KVCompressor(num_layers=1, head_dim=2)
    caches = [torch.zeros(2, 8, 2, 1, 2)]
    settings = KVCompressionSettings("streaming", 5, 2, 0)
    a = Request("a", list(range(3, 11)), SamplingParams(max_tokens=8), frozenset())
    b = Request("b", list(range(13, 21)), SamplingParams(max_tokens=8), frozenset())
    for r in (a, b):
        r.kv_compression, r.kv_compression_pending = settings, True
        sched.add_request(r)
    layouts = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        ending = compressor.prefills_ending(out)
        sched.update(out, [[3] if sr.samples else [] for sr in out.scheduled])
        compressor.compress(ending, kv, caches)
        kv.check_invariants()
        layouts.extend(
            (sr.request.request_id, kv.kv_layout(sr.request.request_id)) for sr in ending
        )
    # a once; b once, then again after its preemption (8 prompt + 4 output tokens -> 5)
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert layouts == [("a", (3, None)), ("b", (3, None)), ("b", (7, None))]
    assert compressor.stats.requests == 3
    assert a.num_output_tokens == b.num_output_tokens == 8
    assert kv.num_free_blocks == 8
