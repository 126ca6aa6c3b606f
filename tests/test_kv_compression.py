"""KV cache compression end to end on the tiny stories model (CPU).

The strongest check: after a compression, every decoded token's logprob equals that of a
dense reference model whose later queries may see, of the prompt, only the positions each
layer and KV head kept (true rotary positions, per-layer lengths for PyramidKV). Then the
engine paths around it: a budget at least the prompt changes nothing, preemption
recompresses, chunked prefill, async scheduling and speculative decoding agree, prefix
caching never serves compressed blocks, and the per-request field.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

import worker.kv_compaction as kv_compaction
from ipc.messages import EngineRequest, KVCompression, SamplingParams
from worker.attention import AttentionMetadata
from worker.config import EngineConfig
from worker.engine import EngineCore

COMPRESS = dict(kv_compression_min_prompt_len=0, kv_compression_window=16)


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(length)] for _ in range(n)]


def engine(stories_path, **cfg: Any) -> EngineCore:
    base: dict[str, Any] = dict(model=str(stories_path), device="cpu", block_size=8)
    base.update(num_gpu_blocks=200, max_num_batched_tokens=512)
    return EngineCore(EngineConfig(**(base | cfg)))


def generate(
    eng: EngineCore, batch: list[list[int]], max_tokens: int = 12, **params: Any
) -> dict[str, tuple[list[int], list[float]]]:
    for i, p in enumerate(batch):
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **params)
        eng.add_request(EngineRequest(f"r{i}", p, sp))
    out: dict[str, tuple[list[int], list[float]]] = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            assert o.error is None, o.error
            toks, lps = out.setdefault(o.request_id, ([], []))
            toks.extend(o.new_token_ids)
            lps.extend(lp.logprobs[0] for lp in o.new_logprobs or [])
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    eng.kv.check_invariants()
    return out


def tokens(out: dict[str, tuple[list[int], list[float]]]) -> dict[str, list[int]]:
    return {k: v[0] for k, v in out.items()}


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "streaming"])
def test_budget_at_least_the_prompt_changes_nothing(stories_path, method):
    batch = prompts(3, 120)
    plain = generate(engine(stories_path), batch)
    eng = engine(stories_path, kv_compression=method, kv_compression_budget=120, **COMPRESS)
    assert tokens(generate(eng, batch)) == tokens(plain)
    assert eng.runner.kv_compressor.stats.requests == 0


class MaskedDense:
    """Reference attention over the step's own K/V (one step holds the whole sequence):
    queries at positions >= S see, of the first S positions, only what their layer and KV
    head kept; the prompt's own queries see everything (that prefill ran uncompressed)."""

    def __init__(self, keeps: list[torch.Tensor], cached_len: int) -> None:
        self.keeps, self.cached_len, self.layer = keeps, cached_len, 0

    def __call__(self, q, k, v, kv_cache, md, params):
        keep, s = self.keeps[self.layer], self.cached_len
        self.layer = (self.layer + 1) % len(self.keeps)
        t, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
        visible = torch.ones(t, t, dtype=torch.bool).tril().repeat(hkv, 1, 1)  # [Hkv, T, T]
        for h in range(hkv):
            dropped = torch.ones(s, dtype=torch.bool)
            dropped[keep[h]] = False
            visible[h, s:, :s] &= ~dropped
        visible = visible.repeat_interleave(hq // hkv, dim=0)  # [Hq, T, T]
        kk = k.repeat_interleave(hq // hkv, dim=1)
        vv = v.repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, kk) * params.scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        return torch.einsum("hqk,khd->qhd", probs, vv)


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "streaming"])
def test_decoding_after_compression_matches_the_masked_reference(stories_path, method, monkeypatch):
    from worker.model_loader import build_model

    keeps: list[torch.Tensor] = []
    real = kv_compaction.compact_layer

    def recording(cache, old_ids, new_ids, keep):
        keeps.append(keep.clone())
        real(cache, old_ids, new_ids, keep)

    monkeypatch.setattr(kv_compaction, "compact_layer", recording)
    s = 200
    (prompt,) = prompts(1, s, seed=3)
    eng = engine(stories_path, kv_compression=method, kv_compression_budget=0.3, **COMPRESS)
    out = generate(eng, [prompt], max_tokens=16, logprobs=0)["r0"]
    mc = eng.model_config
    assert len(keeps) == mc.num_layers and eng.runner.kv_compressor.stats.requests == 1
    kept = [k.shape[1] for k in keeps]
    assert max(kept) < s and (method != "pyramidkv" or kept[0] > kept[-1])

    ref = build_model(
        eng.files, mc, MaskedDense(keeps, s), 512, torch.device("cpu"), torch.float32, False
    )
    ids = torch.tensor(prompt + out[0][:-1])
    n = len(ids)
    md = AttentionMetadata(  # read by no one: the reference attends to the step's own K/V
        torch.tensor([0, n], dtype=torch.int32),
        torch.tensor([n], dtype=torch.int32),
        torch.zeros(1, 1, dtype=torch.int32),
        torch.zeros(n, dtype=torch.long),
        n,
        n,
    )
    with torch.inference_mode():
        hidden = ref(ids, torch.arange(n), [torch.empty(0)] * mc.num_layers, md)
        lp = ref.compute_logits(hidden[s - 1 :]).log_softmax(-1)
    assert lp.argmax(-1).tolist() == out[0]
    got = torch.tensor(out[1])
    want = lp[torch.arange(len(out[0])), torch.tensor(out[0])]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_preemption_recompresses_and_accounting_stays_exact(stories_path):
    batch = prompts(4, 150, seed=1)
    cfg = dict(kv_compression="snapkv", kv_compression_budget=0.25, **COMPRESS)
    eng = engine(stories_path, num_gpu_blocks=45, **cfg)  # the outputs outgrow the cache
    out = generate(eng, batch, max_tokens=100)
    stats = eng.runner.kv_compressor.stats
    assert eng.scheduler.num_preemptions > 0
    assert stats.requests > len(batch)  # preempted requests compressed again
    assert all(len(t) == 100 for t, _ in out.values())
    assert not eng.runner.kv_compressor.windows


def test_window_split_across_prefill_chunks_matches_one_chunk(stories_path):
    # 150 tokens in chunks of 72: the last chunk holds 6 of the window's 16 queries.
    batch = prompts(2, 150, seed=2)
    cfg = dict(kv_compression="snapkv", kv_compression_budget=0.3, **COMPRESS)
    whole = generate(engine(stories_path, **cfg), batch)
    chunked = generate(engine(stories_path, max_num_batched_tokens=72, **cfg), batch)
    assert tokens(chunked) == tokens(whole)


def test_async_scheduling_and_speculation_agree(stories_path):
    batch = prompts(3, 130, seed=4)
    cfg = dict(kv_compression="pyramidkv", kv_compression_budget=0.3, **COMPRESS)
    base = tokens(generate(engine(stories_path, async_scheduling=False, **cfg), batch, 20))
    assert tokens(generate(engine(stories_path, async_scheduling=True, **cfg), batch, 20)) == base
    spec = engine(stories_path, speculative_method="ngram", num_speculative_tokens=3, **cfg)
    assert tokens(generate(spec, batch, max_tokens=20)) == base


def test_prefix_cache_serves_the_uncompressed_prompt_never_compressed_blocks(stories_path):
    (prompt,) = prompts(1, 160, seed=5)
    cfg = dict(kv_compression="snapkv", kv_compression_budget=0.25, **COMPRESS)
    eng = engine(stories_path, **cfg)
    first = generate(eng, [prompt])
    hits_before = eng.kv.prefix_hits
    eng.add_request(
        EngineRequest(
            "again", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        )
    )
    got: list[int] = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            got.extend(o.new_token_ids)
        for rid, table in eng.kv.tables.items():
            if table.offset:  # compressed: never keyed, so never a hit
                assert all(b.hash is None for b in table.blocks), rid
    # The window's 16 tokens are recomputed; every full block before them is a hit.
    assert eng.kv.prefix_hits - hits_before == (160 - 16) // 8 * 8
    assert got == first["r0"][0]
    assert eng.runner.kv_compressor.stats.requests == 2


def test_per_request_field_overrides_the_flags(stories_path):
    batch = prompts(1, 120, seed=6)
    off = engine(stories_path, **COMPRESS)
    generate(off, batch, kv_compression=KVCompression("snapkv", 0.5))
    assert off.runner.kv_compressor.stats.requests == 1
    on = engine(stories_path, kv_compression="snapkv", **COMPRESS)
    generate(on, batch, kv_compression=KVCompression("none"))
    assert on.runner.kv_compressor.stats.requests == 0
    sp = SamplingParams(max_tokens=4, kv_compression=KVCompression("snapkv", 8))  # <= window
    assert on.add_request(EngineRequest("bad", batch[0], sp)).error.startswith(
        "kv_compression.budget"
    )
