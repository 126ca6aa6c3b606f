"""A mixed step's decode rows and prompt chunks attending apart (worker/decode_split.py)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cuda.paged_attention import AttentionMetadata, AttentionParams, QueryCapture
from cuda.prefill_tiles import TileSpec, build_tile_map
from ipc.messages import EngineRequest, SamplingParams
from worker import decode_split as ds
from worker.attention import TorchAttention
from worker.config import EngineConfig
from worker.engine import EngineCore
from worker.input_batch import HostInputs, to_device

Batch = tuple[torch.Tensor, torch.Tensor, AttentionMetadata, np.ndarray, np.ndarray]


def batch(
    reqs: list[tuple[int, int]], hkv: int = 2, group: int = 3, d: int = 16, bs: int = 4
) -> Batch:
    """q, a paged cache (pages shuffled) and the metadata of (q_len, seq_len) requests."""
    g = torch.Generator().manual_seed(len(reqs))
    nblk = [-(-s // bs) for _, s in reqs]
    num_blocks = sum(nblk) + 3
    cache = torch.randn(2, num_blocks, bs, hkv, d, generator=g)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(reqs), max(nblk), dtype=torch.int32)
    start = 0
    slots = []
    for r, ((ql, sl), n) in enumerate(zip(reqs, nblk, strict=True)):
        tables[r, :n] = perm[start : start + n].to(torch.int32)
        start += n
        slots += [int(tables[r, p // bs]) * bs + p % bs for p in range(sl - ql, sl)]
    qsl = np.array([0, *itertools.accumulate(q for q, _ in reqs)], dtype=np.int32)
    seq = np.array([s for _, s in reqs], dtype=np.int32)
    q = torch.randn(int(qsl[-1]), hkv * group, d, generator=g)
    md = AttentionMetadata(
        torch.from_numpy(qsl),
        torch.from_numpy(seq),
        tables,
        torch.tensor(slots, dtype=torch.int64),
        max(q for q, _ in reqs),
        max(s for _, s in reqs),
    )
    return q, cache, md, qsl, seq


def test_leading_decodes() -> None:
    assert ds.leading_decodes(np.array([0, 1, 2, 3, 10])) == 3
    assert ds.leading_decodes(np.array([0, 5, 6, 7])) == 0
    assert ds.leading_decodes(np.array([0, 1, 2])) == 2
    assert ds.leading_decodes(np.array([0, 1, 1, 2])) == 1  # a zero-length entry ends the run


def test_split_metadata_halves() -> None:
    reqs = [(1, 9), (1, 3), (1, 17), (5, 5), (1, 12), (7, 20)]
    _, _, md, qsl, seq = batch(reqs)
    split = ds.split_metadata(md, qsl, seq, torch.from_numpy)
    assert split is not None and split.num_decodes == 3
    d, p = split.decode, split.prefill
    assert d.query_start_loc.tolist() == [0, 1, 2, 3] and d.seq_lens.tolist() == [9, 3, 17]
    assert (d.max_query_len, d.max_seq_len) == (1, 17)
    assert torch.equal(d.block_tables, md.block_tables[:3])
    assert torch.equal(d.slot_mapping, md.slot_mapping[:3])
    assert p.query_start_loc.tolist() == [0, 5, 6, 13] and p.seq_lens.tolist() == [5, 12, 20]
    assert (p.max_query_len, p.max_seq_len) == (7, 20)
    assert torch.equal(p.slot_mapping, md.slot_mapping[3:])
    assert p.prefill_tiles is None


def test_no_split_without_both_kinds_or_with_capture() -> None:
    for reqs in ([(1, 4), (1, 9)], [(3, 3), (1, 9)]):
        _, _, md, qsl, seq = batch(reqs)
        assert ds.split_metadata(md, qsl, seq, torch.from_numpy) is None
    _, _, md, qsl, seq = batch([(1, 4), (3, 3)])
    md.capture = QueryCapture(torch.tensor([1]))
    assert ds.split_metadata(md, qsl, seq, torch.from_numpy) is None


def test_split_tile_map_is_the_prefill_halfs() -> None:
    _, _, md, qsl, seq = batch([(1, 9), (1, 3), (40, 50), (9, 9)])
    spec = TileSpec(3, 16)
    split = ds.split_metadata(md, qsl, seq, torch.from_numpy, spec)
    assert split is not None and split.prefill.prefill_tile_spec == spec
    want = build_tile_map(np.array([0, 40, 49], dtype=np.int32), np.array([50, 9]), spec)
    assert split.prefill.prefill_tiles is not None
    assert torch.equal(split.prefill.prefill_tiles, torch.from_numpy(want))


@pytest.mark.parametrize("window", [None, 5])
def test_split_attention_equals_whole(window: int | None) -> None:
    rnd = random.Random(window)
    reqs = [(1, rnd.randint(1, 40)) for _ in range(7)]
    reqs += [(rnd.randint(2, 12), 0) for _ in range(3)]
    reqs = [(ql, sl or ql + rnd.choice([0, 3, 11])) for ql, sl in reqs]
    reqs.append((1, 6))  # a prompt's last token after the chunks: stays with the prefill half
    q, cache, md, qsl, seq = batch(reqs)
    params = AttentionParams(16**-0.5, window, kv_written=True)
    whole = TorchAttention().attend(q, cache, md, params)
    split = ds.split_metadata(md, qsl, seq, torch.from_numpy)
    assert split is not None and split.num_decodes == 7
    out = torch.full_like(q, float("nan"))
    got = ds.attend_split(TorchAttention().attend, q, cache, split, params, out)
    assert got is out and torch.equal(got, whole)
    md.decode_split = split  # the backend's own dispatch, as a CUDA backend runs it
    backend = TorchAttention()
    backend.splits_decodes = True
    k = v = torch.empty(0)
    assert torch.equal(backend(q, k, v, cache, md, params), whole)


def _host(reqs: list[tuple[int, int]]) -> HostInputs:
    _, _, md, qsl, seq = batch(reqs)
    t = int(qsl[-1])
    return HostInputs(
        input_ids=np.zeros(t, dtype=np.int64),
        positions=np.zeros(t, dtype=np.int64),
        slot_mapping=md.slot_mapping.numpy(),
        query_start_loc=qsl,
        seq_lens=seq,
        block_tables=md.block_tables.numpy(),
        max_query_len=md.max_query_len,
        max_seq_len=md.max_seq_len,
        sample_rows=[],
        sample_sched_index=[],
    )


def test_step_inputs_carry_the_split(monkeypatch: pytest.MonkeyPatch) -> None:
    host = _host([(1, 9), (1, 3), (6, 8)])
    spec = TileSpec(3, 16)
    md = to_device(host, torch.device("cpu"), spec).md
    assert md.decode_split is not None and md.decode_split.num_decodes == 2
    assert md.prefill_tiles is None and md.decode_split.prefill.prefill_tiles is not None
    monkeypatch.setenv(ds.ENV, "0")
    md = to_device(host, torch.device("cpu"), spec).md
    assert md.decode_split is None and md.prefill_tiles is not None
    monkeypatch.setenv(ds.ENV, "maybe")
    with pytest.raises(ValueError, match="HEADRACE_MIXED_SPLIT must be 0 or 1"):
        to_device(host, torch.device("cpu"), spec)


def test_engine_tokens_equal_with_the_split(
    stories_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts chunked beside decoding requests (mixed steps): the same greedy tokens when
    the backend attends the halves apart, and the split did run."""
    runs = []
    calls: list[int] = []
    real = ds.attend_split

    def spy(*a: Any, **k: Any) -> torch.Tensor:
        calls.append(a[3].num_decodes)
        return real(*a, **k)

    monkeypatch.setattr("worker.attention.attend_split", spy)
    for splits in (False, True):
        monkeypatch.setattr(TorchAttention, "splits_decodes", splits)
        engine = EngineCore(
            EngineConfig(model=str(stories_path), device="cpu", max_num_batched_tokens=24)
        )
        try:
            params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
            tokens: dict[str, list[int]] = {}
            engine.add_request(EngineRequest("a", list(range(5, 25)), params))
            steps = 0
            while engine.has_unfinished_requests():
                for o in engine.step():
                    tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                steps += 1
                if steps == 2:
                    for i in range(3):
                        engine.add_request(EngineRequest(f"b{i}", list(range(9 + i, 50)), params))
            runs.append(tokens)
        finally:
            engine.shutdown()
        assert bool(calls) == splits
    assert runs[0] == runs[1] and all(len(t) == 10 for t in runs[0].values())
