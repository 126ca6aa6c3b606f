"""Prefix caching end to end: same outputs on and off, and only the uncached tail computed."""

from __future__ import annotations

import torch

from ipc.messages import EngineRequest, SamplingParams
from tests.tiny_models import make_tiny_model


def shared_prefix_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    system = [1] + torch.randint(3, 512, (21,), generator=g).tolist()  # 22 tokens
    partial = system[:9]  # shares 2 full blocks of 4, then diverges
    prompts = []
    for i in range(10):
        base = system if i % 3 else partial
        prompts.append(base + torch.randint(3, 512, (1 + 2 * i,), generator=g).tolist())
    prompts.append(list(prompts[1]))  # an exact repeat
    return prompts


def run(path, caching: bool, prompts, **engine_args):
    from headrace.llm import LLM

    llm = LLM(str(path), enable_prefix_caching=caching, device="cpu", **engine_args)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    results = llm.generate(prompts, params)
    toks = [r.outputs[0].token_ids for r in results]
    lps = [[lp.logprobs for lp in r.outputs[0].logprobs or []] for r in results]
    return toks, lps, llm.engine


def test_outputs_identical_with_caching_on_and_off_under_preemption(tmp_path, stories_path):
    path = make_tiny_model("llama", tmp_path / "m", stories_path)
    prompts = shared_prefix_prompts()
    args = dict(block_size=4, max_num_batched_tokens=16, num_gpu_blocks=24, max_num_seqs=6)
    off_toks, off_lps, off = run(path, False, prompts, **args)
    on_toks, on_lps, on = run(path, True, prompts, **args)
    assert on.scheduler.num_preemptions > 0 and off.scheduler.num_preemptions > 0
    assert on.kv.prefix_hits > 0 and off.kv.prefix_hits == 0
    assert on_toks == off_toks
    for a, b in zip(on_lps, off_lps, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    assert on.kv.num_free_blocks == on.kv.num_blocks
    on.kv.check_invariants()


def test_second_identical_request_computes_only_its_last_partial_block(stories_path):
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    engine = EngineCore(EngineConfig(model=str(stories_path), device="cpu", block_size=4))
    prompt = [1] + list(range(300, 318))  # 19 tokens: 4 full blocks + 3
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    def scheduled_prompt_tokens(rid: str) -> tuple[int, list[int]]:
        engine.add_request(EngineRequest(rid, prompt, params))
        first = engine.scheduler.schedule()
        count = sum(sr.num_new_tokens for sr in first.scheduled)
        result = engine.runner.execute(first)
        toks = []
        for _, o in engine._postprocess(first, result):
            toks += o.new_token_ids
        while engine.has_unfinished_requests():
            for o in engine.step():
                toks += o.new_token_ids
        return count, toks

    n1, t1 = scheduled_prompt_tokens("a")
    n2, t2 = scheduled_prompt_tokens("b")
    assert n1 == 19
    assert n2 == 3  # 16 tokens (4 full blocks) came from the cache
    assert t1 == t2
    stats = engine.stats()
    assert stats.prefix_cache_hits == 16 and stats.prefix_cache_queries == 38


def test_request_arriving_during_prefill_shares_full_blocks(stories_path):
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    engine = EngineCore(
        EngineConfig(model=str(stories_path), device="cpu", block_size=4, max_num_batched_tokens=12)
    )
    prompt = [1] + list(range(300, 330))  # 31 tokens: prefilled over 3 steps of 12
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request(EngineRequest("a", prompt, params))
    engine.step()
    engine.step()  # a has 24 tokens computed: 6 full blocks
    engine.add_request(EngineRequest("b", prompt, params))
    sched = engine.scheduler.schedule()
    b = next(sr for sr in sched.scheduled if sr.request.request_id == "b")
    # a's last chunk (7 tokens) is scheduled first and keys its 7th block in the same step;
    # b then finds all 7 full blocks (28 tokens) and computes only its last 3 tokens.
    assert b.start == 28 and b.num_new_tokens == 3 and b.request.num_cached_tokens == 28
    engine._postprocess(sched, engine.runner.execute(sched))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_gateway_prefix_routing_uses_the_workers_block_keys():
    from gateway.router import Router
    from ipc.block_hash import block_hashes
    from worker.kv_cache import KVCacheManager
    from worker.request import Request

    prompt = list(range(100, 141))  # 41 tokens: 10 full blocks of 4
    router = Router("prefix", block_size=4)
    kv = KVCacheManager(num_blocks=32, block_size=4)
    req = Request("a", prompt, SamplingParams(max_tokens=1), frozenset())
    assert kv.allocate_slots(req, len(prompt))
    worker_keys = [h for h, _ in kv.tables["a"].keys]
    assert router._prefix_keys(prompt) == worker_keys == block_hashes(prompt, 4)
