"""KV cache manager: allocation, reference counts, prefix hits, LRU eviction, collisions."""

from __future__ import annotations

import pytest

import worker.kv_cache as kv_cache_module
from ipc.messages import SamplingParams
from worker.kv_cache import KVCacheManager
from worker.request import Request


def make(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), 4, frozenset())


def admit(kv: KVCacheManager, req: Request) -> int:
    hits, n = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - n, hits)
    req.num_computed_tokens = req.num_tokens
    return n


def test_allocation_and_free_return_all_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=False)
    a = make("a", list(range(10)))
    assert kv.allocate_slots(a, 10)
    assert len(kv.block_ids("a")) == 3
    assert kv.num_free_blocks == 7
    assert not kv.allocate_slots(make("b", list(range(40))), 40)  # needs 10: refused
    assert kv.num_free_blocks == 7  # and nothing changed
    kv.free("a")
    assert kv.num_free_blocks == 10
    with pytest.raises(RuntimeError):
        blocks = kv.blocks[:1]
        blocks[0].ref_cnt = 0
        kv.req_blocks["x"] = blocks
        kv.free("x")  # freeing a block with ref_cnt 0 is a double free


def test_second_identical_request_hits_all_full_blocks_but_the_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 114))  # 14 tokens: 3 full blocks + 2
    assert admit(kv, make("a", prompt)) == 0
    b = make("b", prompt)
    hits, n = kv.get_computed_blocks(b)
    assert n == 12  # 3 full blocks; b computes only the last partial block (2 tokens)
    assert [h.block_id for h in hits] == kv.block_ids("a")[:3]
    # A prompt of exactly 3 blocks must still compute its last token: 2 blocks hit.
    c = make("c", prompt[:12])
    assert kv.get_computed_blocks(c)[1] == 8


def test_partly_shared_prefix_hits_only_the_shared_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    admit(kv, make("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 9]))
    b = make("b", [1, 2, 3, 4, 5, 6, 0, 8, 9, 9])  # differs inside block 2
    assert kv.get_computed_blocks(b)[1] == 4


def test_shared_blocks_are_reference_counted():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(9))
    admit(kv, make("a", prompt))
    admit(kv, make("b", prompt))
    shared = kv.block_ids("a")[:2]
    assert kv.block_ids("b")[:2] == shared
    assert all(kv.blocks[i].ref_cnt == 2 for i in shared)
    kv.free("a")
    assert all(kv.blocks[i].ref_cnt == 1 for i in shared)
    kv.free("b")
    kv.check_invariants()
    assert kv.num_free_blocks == 16


def test_eviction_is_least_recently_used_first():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    for rid, toks in [("a", [1, 2, 0]), ("b", [3, 4, 0]), ("c", [5, 6, 0])]:
        admit(kv, make(rid, toks))
    for rid in ["b", "a", "c"]:  # freed in this order: b's blocks are least recently used
        kv.free(rid)
    # Reuse "a": its cached block leaves the free queue; then new data evicts LRU first.
    assert admit(kv, make("a2", [1, 2, 9])) == 2
    d = make("d", [7, 7, 7])  # needs 2 blocks: takes the 2 LRU free blocks
    admit(kv, d)
    assert kv.get_computed_blocks(make("b2", [3, 4, 0]))[1] == 0  # b was evicted first
    assert kv.get_computed_blocks(make("c2", [5, 6, 0]))[1] == 2  # c survives
    kv.check_invariants()


def test_forced_hash_collision_never_returns_wrong_kv(monkeypatch):
    # Every block gets the same hash: only the confirmation keeps prompts apart.
    monkeypatch.setattr(kv_cache_module, "hash_block_tokens", lambda *a, **k: 42)
    kv = KVCacheManager(num_blocks=32, block_size=2)
    admit(kv, make("a", [1, 2, 3, 4, 5]))  # blocks [1,2] [3,4]
    admit(kv, make("b", [7, 8, 3, 4, 5]))  # blocks [7,8] [3,4] under another parent
    # c shares b's first block but a's second block content under b's parent: b's entry.
    c = make("c", [7, 8, 3, 4, 6])
    hits, n = kv.get_computed_blocks(c)
    assert n == 4 and [h.block_id for h in hits] == kv.block_ids("b")[:2]
    # d shares nothing at block 0, so even the identical second block must not hit.
    d = make("d", [9, 9, 3, 4, 5])
    assert kv.get_computed_blocks(d)[1] == 0
    e = make("e", [1, 2, 3, 4, 9])
    hits, n = kv.get_computed_blocks(e)
    assert n == 4 and [h.block_id for h in hits] == kv.block_ids("a")[:2]


def test_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=False)
    admit(kv, make("a", list(range(20))))
    assert kv.get_computed_blocks(make("b", list(range(20))))[1] == 0
