"""KV compression's device work: the kept K/V are exactly the ones an independent
reference picks (softmax attention of the window, torch.topk), in the request's first new
blocks; the block accounting around it (KVCacheManager.compact) is exact."""

from __future__ import annotations

import math

import pytest
import torch

from ipc.messages import SamplingParams
from worker.kv_cache import KVCacheManager
from worker.kv_compaction import KVCompressor, _Window
from worker.kv_compression import NUM_SINKS, POOL_KERNEL, KVCompressionSettings
from worker.request import Request
from worker.scheduler import ScheduledRequest

BS, HQ, HKV, D, LAYERS = 4, 4, 2, 8, 3


def reference_keep(q: torch.Tensor, k: torch.Tensor, kept: int) -> torch.Tensor:
    """[Hkv, kept] written from the paper's description, in float64: the window's causal
    softmax attention, summed over its queries, mean-pooled over POOL_KERNEL neighbours
    (zero padding counted), averaged over the query group, top-k, plus the window."""
    w, s = q.shape[0], k.shape[0]
    group = HQ // HKV
    keep = []
    for h in range(HKV):
        votes = torch.zeros(s - w, dtype=torch.float64)
        for g in range(group):
            qh = q[:, h * group + g].double()  # [W, D]
            logits = qh @ k[:, h].double().T / math.sqrt(D)  # [W, S]
            for j in range(w):
                logits[j, s - w + j + 1 :] = float("-inf")
            attn = torch.softmax(logits, dim=-1)[:, : s - w].sum(0)
            pad = torch.cat([torch.zeros(POOL_KERNEL // 2), attn, torch.zeros(POOL_KERNEL // 2)])
            votes += pad.unfold(0, POOL_KERNEL, 1).mean(-1) / group
        top = torch.topk(votes, kept - w).indices.sort().values
        keep.append(torch.cat([top, torch.arange(s - w, s)]))
    return torch.stack(keep)


def setup(prompt_len: int, method: str, budget: float, window: int, num_blocks: int = 64):
    torch.manual_seed(prompt_len)
    kv = KVCacheManager(num_blocks, BS, enable_caching=True)
    req = Request("r", list(range(prompt_len)), SamplingParams(max_tokens=4), frozenset())
    req.kv_compression = KVCompressionSettings(method, budget, window, 0)
    req.kv_compression_pending = True
    assert kv.allocate_slots(req, prompt_len)
    caches = [torch.randn(2, num_blocks, BS, HKV, D) for _ in range(LAYERS)]
    queries = [torch.randn(window, HQ, D) for _ in range(LAYERS)]
    comp = KVCompressor(LAYERS, D)
    win = _Window(req, 0)
    # Two chunks, out of order: the window may span prefill chunks.
    win.chunks = [
        (prompt_len - 2, [q[-2:] for q in queries]),
        (prompt_len - window, [q[:-2] for q in queries]),
    ]
    comp.windows["r"] = win
    return kv, req, caches, queries, comp


def rows_of(cache: torch.Tensor, table: list[int], length: int) -> torch.Tensor:
    return cache[:, table].reshape(2, -1, HKV, D)[:, :length]  # [2, S, Hkv, D]


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "streaming"])
def test_compaction_keeps_exactly_the_reference_selection(method):
    s, window = 53, 6
    kv, req, caches, queries, comp = setup(s, method, 0.3, window)
    old_table = kv.block_ids("r")
    before = [rows_of(c, old_table, s).clone() for c in caches]
    free_before = kv.num_free_blocks
    kept = req.kv_compression.kept_per_layer(s, LAYERS)
    comp.compress([ScheduledRequest(req, s, 0)], kv, caches)
    top = max(kept)
    new_table = kv.block_ids("r")
    assert len(new_table) == -(-top // BS)
    assert kv.num_free_blocks == free_before + len(old_table) - len(new_table)
    offset, shift = kv.kv_layout("r")
    assert offset == s - top
    assert shift == (None if method != "pyramidkv" else tuple(top - k for k in kept))
    kv.check_invariants()
    for layer in range(LAYERS):
        k_before = before[layer][0]
        if method == "streaming":
            keep = torch.cat(
                [torch.arange(NUM_SINKS), torch.arange(s - kept[layer] + NUM_SINKS, s)]
            )
            keep = keep.expand(HKV, -1)
        else:
            keep = reference_keep(queries[layer], k_before, kept[layer])
        after = rows_of(caches[layer], new_table, kept[layer])
        for h in range(HKV):
            assert torch.equal(after[:, :, h], before[layer][:, keep[h], h])
    assert not comp.windows and not req.kv_compression_pending
    assert comp.stats.requests == 1 and comp.stats.tokens_after == top


def test_pyramid_budgets_shrink_with_depth_and_keep_the_mean():
    settings = KVCompressionSettings("pyramidkv", 400, 32, 0)
    kept = settings.kept_per_layer(2000, 32)
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    assert abs(sum(kept) / 32 - 400) <= 1
    assert all(32 < k < 2000 for k in kept)
    assert KVCompressionSettings("snapkv", 400, 32, 0).kept_per_layer(2000, 32) == [400] * 32


def test_budget_rules():
    s = KVCompressionSettings("snapkv", 0.25, 32, 100)
    assert s.total(99) is None  # below the minimum prompt length
    assert s.total(1000) == 250
    assert s.total(120) == 33  # never below the window plus one
    assert KVCompressionSettings("snapkv", 500, 32, 0).total(500) is None  # keeps all


def test_compaction_reuses_its_own_blocks_when_the_pool_is_empty():
    s, window = 40, 4
    kv, req, caches, queries, comp = setup(s, "snapkv", 0.25, window, num_blocks=10)
    assert kv.num_free_blocks == 0
    before = [rows_of(c, kv.block_ids("r"), s).clone() for c in caches]
    comp.compress([ScheduledRequest(req, s, 0)], kv, caches)
    new_table = kv.block_ids("r")
    assert len(new_table) == 3 and kv.num_free_blocks == 7
    kv.check_invariants()
    for layer in range(LAYERS):
        keep = reference_keep(queries[layer], before[layer][0], 10)
        after = rows_of(caches[layer], new_table, 10)
        for h in range(HKV):
            assert torch.equal(after[:, :, h], before[layer][:, keep[h], h])


def test_compact_never_keys_compressed_blocks_and_keeps_the_prompt_cached():
    kv = KVCacheManager(20, BS, enable_caching=True)
    a = Request("a", list(range(3, 43)), SamplingParams(max_tokens=4), frozenset())
    assert kv.allocate_slots(a, 40)
    a.num_computed_tokens = 40
    old = kv.block_ids("a")
    keyed = {b.block_id for b in kv.blocks if b.hash is not None}
    assert keyed == set(old)  # the full prompt blocks were keyed as they filled
    plan = kv.compact("a", 40, 10)
    assert plan is not None and plan[0] == old
    new = plan[1]
    assert not set(new) & set(old)  # fresh blocks first: the prompt's stay cached
    assert all(kv.blocks[i].hash is None for i in new)
    assert kv.allocate_slots(a, 8)  # decode on: 40 - 30 + 8 = 18 cached tokens, 5 blocks
    assert len(kv.block_ids("a")) == 5
    assert all(kv.blocks[i].hash is None for i in kv.block_ids("a"))
    # The uncompressed prompt is still a prefix hit for the next request.
    b = Request("b", list(range(3, 43)), SamplingParams(max_tokens=4), frozenset())
    hits, n = kv.get_computed_blocks(b)
    assert n == 36 and [h.block_id for h in hits] == old[:9]
    with pytest.raises(ValueError):
        kv.compact("a", 18, 5)  # once per admission
    kv.free("a")
    assert kv.num_free_blocks == 20
    kv.check_invariants()


def test_compact_refuses_without_room_and_changes_nothing():
    kv = KVCacheManager(9, BS, enable_caching=True)
    a = Request("a", list(range(3, 35)), SamplingParams(max_tokens=4), frozenset())
    assert kv.allocate_slots(a, 32)
    b = Request("b", list(range(3, 35)), SamplingParams(max_tokens=4), frozenset())
    hits, n = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, 32 - n, hits)  # b shares all of a's blocks but the last
    table = kv.block_ids("a")
    assert kv.num_free_blocks == 0
    assert kv.compact("a", 32, 12) is None  # 3 blocks needed; only a's last is its own
    assert kv.block_ids("a") == table and kv.kv_layout("a") == (0, None)
    kv.check_invariants()


def test_fp8_cache_scores_with_its_scale_and_moves_bytes_exactly():
    s, window, scale = 45, 5, 0.25
    kv, req, caches, queries, _ = setup(s, "snapkv", 0.3, window)
    caches = [c.to(torch.float8_e4m3fn) for c in caches]
    comp = KVCompressor(LAYERS, D, k_scales=[scale] * LAYERS)
    comp.windows["r"] = _Window(req, 0, [(s - window, queries)])
    old_table = kv.block_ids("r")
    before = [rows_of(c.view(torch.uint8), old_table, s).clone() for c in caches]
    comp.compress([ScheduledRequest(req, s, 0)], kv, caches)
    kept = req.kv_compression.kept_per_layer(s, LAYERS)[0]
    for layer in range(LAYERS):
        k = before[layer][0].view(torch.float8_e4m3fn).float() * scale  # as attention reads
        keep = reference_keep(queries[layer], k, kept)
        after = rows_of(caches[layer].view(torch.uint8), kv.block_ids("r"), kept)
        for h in range(HKV):
            assert torch.equal(after[:, :, h], before[layer][:, keep[h], h])


def test_graph_layer_inputs_pad_per_layer_rows_or_copy_the_shared_ones():
    import numpy as np

    from worker.cuda_graphs import LayerInputs
    from worker.input_batch import HostInputs

    li = LayerInputs(3, 4, 8, torch.device("cpu"), pin=False)
    z = np.zeros(3, dtype=np.int64)
    host = HostInputs(
        input_ids=z, positions=z, slot_mapping=z,
        query_start_loc=np.array([0, 1, 3], dtype=np.int32),
        seq_lens=np.array([5, 9], dtype=np.int32), block_tables=np.zeros((2, 1), dtype=np.int32),
        max_query_len=2, max_seq_len=9, sample_rows=[], sample_sched_index=[],
    )  # fmt: skip
    host.layer_seq_lens = np.array([[5, 9], [4, 8], [3, 7]], dtype=np.int32)
    host.layer_slot_mapping = np.arange(9, dtype=np.int64).reshape(3, 3)
    li.write(host, torch.empty(0), torch.empty(0), bs=4, n=6)
    assert li.seq_lens.tolist() == [[5, 9, 0, 0], [4, 8, 0, 0], [3, 7, 0, 0]]
    assert li.slot_mapping[:, :6].tolist() == [
        [0, 1, 2, -1, -1, -1],
        [3, 4, 5, -1, -1, -1],
        [6, 7, 8, -1, -1, -1],
    ]
    host.layer_seq_lens = host.layer_slot_mapping = None
    shared_seq, shared_slots = torch.tensor([6, 2, 0, 0], dtype=torch.int32), torch.arange(8)
    li.write(host, shared_seq, shared_slots, bs=4, n=6)
    assert li.seq_lens.tolist() == [[6, 2, 0, 0]] * 3
    assert li.slot_mapping[:, :6].tolist() == [list(range(6))] * 3
