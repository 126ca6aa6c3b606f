"""The tensor-core decode kernel (cuda/decode_attention.cu) against the torch reference (GPU).

Fresh random inputs per case; physical pages shuffled; free pages, the tail of each last
page and the pages padding entries point at are NaN; outputs poisoned with NaN. Split
counts are forced (1: the kernel writes the output, no merge; several: the merge) as well as
planned. Accuracy: FlashAttention's bar (twice the error of plain low-precision torch) for
16-bit caches, a fixed tolerance for FP8 ones (the reference reads the same FP8 values).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
import torch

from cuda import decode_attention as da
from cuda.kv_write import quantize_kv, write_kv
from cuda.paged_attention import (
    AttentionMetadata,
    AttentionParams,
    paged_attention,
    paged_attention_ref,
)
from cuda.paged_attention_kernels import decode_workspace
from tests.gpu.helpers import new_decode_kernel  # noqa: F401 (the fixture, by name)
from tests.gpu.test_gpu_kernels import Batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.usefixtures("new_decode_kernel"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Not multiples of 16 or 32 next to ones that are, short and long.
LENGTHS = [1, 7, 15, 16, 17, 31, 32, 33, 100, 255, 256, 257, 511, 513, 1000, 2047, 4099, 7001]


def _reqs(n_random: int = 4, max_len: int = 3000) -> list[tuple[int, int]]:
    reqs = [(1, s) for s in LENGTHS] + [(1, random.randint(1, max_len)) for _ in range(n_random)]
    reqs += [(0, 0), (0, 0)]  # graph padding entries
    random.shuffle(reqs)
    return reqs


def _force_splits(monkeypatch: pytest.MonkeyPatch, splits: int | None) -> None:
    if splits is None:
        return
    real = da.plan_decode

    def forced(*args: Any) -> da.DecodePlan:
        return replace(real(*args), splits=splits)

    monkeypatch.setattr(da, "plan_decode", forced)


def _batch(group: int, head_dim: int, block_size: int, dtype: torch.dtype, **kw: Any) -> Batch:
    hkv = kw.pop("num_kv_heads", random.choice([1, 2, 3]))
    return Batch(
        kw.pop("reqs", None) or _reqs(),
        num_kv_heads=hkv,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )


def _rows(b: Batch) -> torch.Tensor:
    """Every request's query row (padding entries repeat a neighbour's start: left out)."""
    return (b.query_start_loc[1:] - 1)[b.seq_lens > 0].long()


class Expect:
    """The reference for a batch (computed once) and the accuracy bar's baseline."""

    def __init__(self, b: Batch, window: int | None = None) -> None:
        self.rows = _rows(b)
        md, params = b.metadata(), AttentionParams(b.scale, sliding_window=window)
        self.ref = paged_attention_ref(b.q.float(), b.kv_cache.float(), md, params)[self.rows]
        self.base = (b.lowp(window)[self.rows].float() - self.ref).abs().max().item()

    def check(self, out: torch.Tensor, what: str = "") -> None:
        got = out[self.rows].float()
        assert torch.isfinite(got).all(), f"{what}: unwritten or NaN output elements"
        err = (got - self.ref).abs().max().item()
        assert err <= 2 * self.base + 2e-3, f"{what}: error {err:.3g} vs torch {self.base:.3g}"


def _check16(b: Batch, out: torch.Tensor, window: int | None = None) -> None:
    Expect(b, window).check(out)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 3, 4, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_matches_reference(
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    head_dim: int,
    group: int,
    block_size: int,
) -> None:
    random.seed(hash((dtype, head_dim, group, block_size)) & 0xFFFF)
    torch.manual_seed(random.randint(0, 1 << 30))
    b = _batch(group, head_dim, block_size, dtype)
    expect = Expect(b)
    expect.check(b.run(), "planned")
    expect.check(b.run(max_seq_len=131072), "graph bound")  # more splits, same answer
    for splits in (1, 5, 64):  # 1: written by the decode kernel itself, no merge
        with monkeypatch.context() as m:
            _force_splits(m, splits)
            expect.check(b.run(), f"{splits} splits")


@pytest.mark.parametrize("group", [1, 3, 4, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_kv_matches_reference(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, head_dim: int, group: int
) -> None:
    random.seed(hash(("fp8", dtype, head_dim, group)) & 0xFFFF)
    torch.manual_seed(random.randint(0, 1 << 30))
    b = _batch(group, head_dim, random.choice([16, 32]), dtype)
    k_scale, v_scale = 0.5, 0.25
    cache16 = b.kv_cache
    b.kv_cache = torch.stack([quantize_kv(cache16[0], k_scale), quantize_kv(cache16[1], v_scale)])
    params = AttentionParams(b.scale, k_scale=k_scale, v_scale=v_scale)
    want = paged_attention_ref(b.q.float(), b.kv_cache, b.metadata(), params)
    rows = _rows(b)
    for splits in (None, 1, 7):
        with monkeypatch.context() as m:
            _force_splits(m, splits)
            got = b.run(k_scale=k_scale, v_scale=v_scale)[rows].float()
        assert bool(torch.isfinite(got).all()), splits
        torch.testing.assert_close(got, want[rows], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("window", [1, 16, 17, 300, 4096])
def test_sliding_window(monkeypatch: pytest.MonkeyPatch, window: int) -> None:
    torch.manual_seed(window)
    random.seed(window)
    b = _batch(4, 128, 16, torch.bfloat16, num_kv_heads=2)
    expect = Expect(b, window)
    for splits in (None, 1, 9):
        with monkeypatch.context() as m:
            _force_splits(m, splits)
            expect.check(b.run(sliding_window=window), f"{splits} splits")


def test_large_group_takes_head_chunks() -> None:
    for group in (9, 16):
        b = _batch(group, 64, 16, torch.float16, num_kv_heads=2)
        _check16(b, b.run())


def test_old_kernel_still_selectable_and_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    b = _batch(4, 128, 16, torch.bfloat16, num_kv_heads=8)
    new = b.run()
    monkeypatch.setenv(da.ENV, "old")
    old = b.run()
    rows = _rows(b)
    assert (new[rows].float() - old[rows].float()).abs().max().item() < 2e-2
    _check16(b, old)


def test_block_size_8_falls_back_to_old_kernel() -> None:
    b = _batch(4, 128, 8, torch.bfloat16, num_kv_heads=2)
    _check16(b, b.run())


def test_llama3_8b_shape_planned_splits() -> None:
    """The benchmark's shape: 8 KV heads, group 4, bf16, block 16, at a few batch sizes."""
    torch.manual_seed(11)
    for batch, length in ((1, 20000), (8, 3000), (64, 700)):
        reqs = [(1, random.randint(length // 2, length)) for _ in range(batch)]
        b = _batch(4, 128, 16, torch.bfloat16, num_kv_heads=8, reqs=reqs)
        _check16(b, b.run())


@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_graph_replay_equals_eager(fp8: bool) -> None:
    """write_kv + decode captured at short lengths, replayed at long ones (and a window):
    bitwise equal to eager, close to the reference."""
    torch.manual_seed(5)
    dtype, hkv, group, d, bs, batch, max_len = torch.bfloat16, 8, 4, 128, 16, 6, 12000
    dev = torch.device("cuda")
    num_blocks = batch * max_len // bs + 1
    cache = torch.randn(2, num_blocks, bs, hkv, d, dtype=dtype, device=dev)
    k_scale, v_scale = (0.5, 0.25) if fp8 else (1.0, 1.0)
    if fp8:
        cache = torch.stack([quantize_kv(cache[0], k_scale), quantize_kv(cache[1], v_scale)])
    tables = torch.randperm(num_blocks - 1, device=dev)[: batch * max_len // bs]
    tables = tables.view(batch, -1).to(torch.int32).contiguous()
    q = torch.randn(batch, hkv * group, d, dtype=dtype, device=dev)
    k_new, v_new = torch.randn(2, batch, hkv, d, dtype=dtype, device=dev)
    qsl = torch.tensor([0, 1, 2, 3, 4, 5, 5], dtype=torch.int32, device=dev)[: batch + 1]
    seq_lens = torch.zeros(batch, dtype=torch.int32, device=dev)
    slots = torch.zeros(batch, dtype=torch.int64, device=dev)
    out = torch.empty_like(q)
    kv_dtype = cache.dtype if fp8 else None
    workspace = decode_workspace(dtype, d, batch, hkv * group, hkv, max_len, dev, kv_dtype)
    md = AttentionMetadata(qsl, seq_lens, tables, slots, max_query_len=1, max_seq_len=max_len)
    params = AttentionParams(d**-0.5, sliding_window=5000, k_scale=k_scale, v_scale=v_scale)

    def set_lens(lens: list[int]) -> None:
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        pos = torch.tensor([max(n - 1, 0) for n in lens], device=dev)
        sl = tables[torch.arange(batch, device=dev), pos // bs].long() * bs + pos % bs
        sl[seq_lens == 0] = -1
        slots.copy_(sl)

    def step() -> None:
        write_kv(k_new, v_new, cache, slots, k_scale, v_scale)
        paged_attention(q, cache, md, params, out, workspace)

    set_lens([3, 17, 5, 40, 129, 0])  # the last entry is padding (q_len 0, seq_len 0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile and load outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for lens in ([12000, 4999, 2, 8191, 600, 0], [1, 5001, 11999, 16, 257, 0]):
        set_lens(lens)
        q.normal_()
        k_new.normal_()
        v_new.normal_()
        before = cache.clone()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        cache.copy_(before)
        out.fill_(float("nan"))
        step()
        torch.cuda.synchronize()
        assert torch.equal(replayed[:-1], out[:-1])
        ref = paged_attention_ref(q.float(), cache, md, params)
        assert torch.isfinite(out[:-1]).all()
        assert (out[:-1].float() - ref[:-1]).abs().max().item() < 3e-2
