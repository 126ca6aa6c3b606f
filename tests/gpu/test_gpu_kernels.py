"""CUDA attention and KV-write kernels against their pure-torch references (GPU only).

Every case draws fresh random inputs, shuffles physical block ids, fills free pages (and the
unused tail of each last page) with NaN, and poisons outputs with NaN, so a stale read or an
unwritten element fails. Accuracy bar (FlashAttention's): error against an fp32 reference no
more than twice that of a plain low-precision torch computation, plus a small atol.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

from cuda.kv_write import write_kv, write_kv_ref
from cuda.paged_attention import (
    AttentionMetadata,
    AttentionParams,
    paged_attention,
    paged_attention_ref,
)
from cuda.paged_attention_kernels import decode_workspace

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONTEXTS = [1, 15, 16, 17, 31, 32, 33, 511, 512, 513, 2000, 4099]
NUM_KV_HEADS = 2


class Batch:
    """A paged batch: requests given as (q_len, seq_len); (0, 0) is a padding entry."""

    def __init__(
        self,
        reqs: list[tuple[int, int]],
        *,
        num_kv_heads: int,
        group: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        spare_blocks: int = 7,
    ) -> None:
        dev = torch.device("cuda")
        self.reqs = reqs
        nblk = [math.ceil(s / block_size) for _, s in reqs]
        num_blocks = sum(nblk) + spare_blocks + 1
        perm = torch.randperm(num_blocks).tolist()
        poison_block = perm.pop()  # padding entries of block tables point at a NaN page
        max_blocks = max(max(nblk), 1) + 2
        tables = torch.full((len(reqs), max_blocks), poison_block, dtype=torch.int32)
        cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
        used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
        for r, ((_, s), n) in enumerate(zip(reqs, nblk, strict=True)):
            ids = [perm.pop() for _ in range(n)]
            tables[r, :n] = torch.tensor(ids, dtype=torch.int32)
            for p in range(s):
                used[ids[p // block_size], p % block_size] = True
        cache[:, ~used] = float("nan")
        self.kv_cache = cache.to(dev)
        self.block_tables = tables.to(dev)
        q_lens = [ql for ql, _ in reqs]
        starts = [0]
        for ql in q_lens:
            starts.append(starts[-1] + ql)
        self.query_start_loc = torch.tensor(starts, dtype=torch.int32, device=dev)
        self.seq_lens = torch.tensor([s for _, s in reqs], dtype=torch.int32, device=dev)
        self.q = torch.randn(starts[-1], num_kv_heads * group, head_dim, dtype=dtype, device=dev)
        self.max_query_len = max(q_lens)
        self.max_seq_len = max(s for _, s in reqs)
        self.scale = head_dim**-0.5

    def metadata(self, max_seq_len: int | None = None) -> AttentionMetadata:
        """This batch's layout; max_seq_len: a larger bound (a CUDA graph's) than its own."""
        no_slots = torch.empty(0, dtype=torch.int64, device=self.q.device)  # attention only
        return AttentionMetadata(
            self.query_start_loc,
            self.seq_lens,
            self.block_tables,
            no_slots,
            self.max_query_len,
            max_seq_len or self.max_seq_len,
        )

    def run(self, max_seq_len: int | None = None, **params: Any) -> torch.Tensor:
        """The dispatcher's output; params: AttentionParams fields besides the scale."""
        out = torch.full_like(self.q, float("nan"))
        md, layer = self.metadata(max_seq_len), AttentionParams(self.scale, **params)
        paged_attention(self.q, self.kv_cache, md, layer, out)
        torch.cuda.synchronize()
        return out

    def reference(self, **params: Any) -> torch.Tensor:
        md, layer = self.metadata(), AttentionParams(self.scale, **params)
        return paged_attention_ref(self.q.float(), self.kv_cache.float(), md, layer)

    def lowp(self, sliding_window: int | None = None) -> torch.Tensor:
        """Plain attention computed in the input dtype (scores, probabilities, P @ V): the
        accuracy bar's baseline."""
        q, cache = self.q, self.kv_cache
        hkv, d = cache.shape[3], cache.shape[4]
        bs = cache.shape[2]
        group = q.shape[1] // hkv
        out = torch.zeros_like(q)
        starts = self.query_start_loc.tolist()
        for r, (ql, s) in enumerate(self.reqs):
            if ql == 0:
                continue
            blocks = self.block_tables[r, : math.ceil(s / bs)].long()
            k = cache[0, blocks].reshape(-1, hkv, d)[:s].repeat_interleave(group, 1)
            v = cache[1, blocks].reshape(-1, hkv, d)[:s].repeat_interleave(group, 1)
            qr = q[starts[r] : starts[r] + ql].transpose(0, 1)  # [Hq, ql, D]
            scores = (qr @ k.permute(1, 2, 0)) * self.scale  # [Hq, ql, S]
            qpos = torch.arange(s - ql, s, device=q.device)[:, None]
            kpos = torch.arange(s, device=q.device)[None, :]
            hidden = kpos > qpos
            if sliding_window is not None:
                hidden |= kpos <= qpos - sliding_window
            scores = scores.masked_fill(hidden, float("-inf"))
            probs = torch.softmax(scores.float(), -1).to(q.dtype)
            out[starts[r] : starts[r] + ql] = (probs @ v.transpose(0, 1)).transpose(0, 1)
        return out


def check(batch: Batch, out: torch.Tensor) -> None:
    assert torch.isfinite(out).all(), "unwritten or NaN output elements"
    ref = batch.reference()
    err = (out.float() - ref).abs().max().item()
    base = (batch.lowp().float() - ref).abs().max().item()
    assert err <= 2 * base + 2e-3, f"kernel error {err:.3g} vs low-precision torch {base:.3g}"


def decode_reqs(n_long: int = 0) -> list[tuple[int, int]]:
    reqs = [(1, s) for s in CONTEXTS]
    reqs.insert(3, (0, 0))
    reqs += [(1, random.randint(1, 3000)) for _ in range(n_long)]
    reqs.append((0, 0))
    random.shuffle(reqs)
    return reqs


def prefill_reqs() -> list[tuple[int, int]]:
    reqs: list[tuple[int, int]] = []
    for s in CONTEXTS:
        if s <= 600:
            reqs.append((s, s))  # whole prompt
        reqs.append((min(s, random.choice([1, 2, 7, 64, 129, 300])), s))  # chunk after cache
    reqs.insert(5, (0, 0))
    reqs.append((0, 0))
    random.shuffle(reqs)
    return reqs


DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(dtype: torch.dtype, head_dim: int, group: int, block_size: int) -> None:
    b = Batch(
        decode_reqs(4),
        num_kv_heads=NUM_KV_HEADS,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )
    check(b, b.run())
    # A larger bound on seq_len (what a CUDA graph is captured with) changes nothing.
    check(b, b.run(max_seq_len=65536))


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill(dtype: torch.dtype, head_dim: int, group: int, block_size: int) -> None:
    b = Batch(
        prefill_reqs(),
        num_kv_heads=NUM_KV_HEADS,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )
    check(b, b.run())


@pytest.mark.parametrize("block_size", [8, 64, 128])
def test_other_block_sizes(block_size: int) -> None:
    for reqs in (decode_reqs(), prefill_reqs()):
        b = Batch(
            reqs, num_kv_heads=8, group=4, head_dim=128, block_size=block_size, dtype=torch.bfloat16
        )
        check(b, b.run())


def test_single_long_decode_many_splits() -> None:
    b = Batch(
        [(1, 30001)], num_kv_heads=8, group=4, head_dim=128, block_size=16, dtype=torch.bfloat16
    )
    check(b, b.run())


def test_group_not_power_of_two_and_large() -> None:
    for group in (3, 6, 16):
        for reqs in (decode_reqs(), prefill_reqs()):
            b = Batch(
                reqs, num_kv_heads=2, group=group, head_dim=64, block_size=16, dtype=torch.float16
            )
            check(b, b.run())


def test_small_head_dim_falls_back_to_reference() -> None:
    b = Batch(
        decode_reqs(), num_kv_heads=2, group=2, head_dim=8, block_size=16, dtype=torch.bfloat16
    )
    check(b, b.run())


def test_strided_q_and_out() -> None:
    """q as a view of a fused qkv projection, out as a view of a wider buffer."""
    b = Batch(
        prefill_reqs(), num_kv_heads=2, group=4, head_dim=128, block_size=16, dtype=torch.bfloat16
    )
    t, hq, d = b.q.shape
    qkv = torch.randn(t, (hq + 4) * d, dtype=b.q.dtype, device="cuda")
    qkv[:, : hq * d] = b.q.reshape(t, -1)
    b.q = qkv[:, : hq * d].view(t, hq, d)
    wide = torch.full((t, (hq + 2) * d), float("nan"), dtype=b.q.dtype, device="cuda")
    out = wide[:, : hq * d].view(t, hq, d)
    paged_attention(b.q, b.kv_cache, b.metadata(), AttentionParams(b.scale), out)
    torch.cuda.synchronize()
    check(b, out)
    assert wide[:, hq * d :].isnan().all(), "wrote outside out"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_write_kv(dtype: torch.dtype, strided: bool) -> None:
    num_blocks, bs, hkv, d, t = 50, 16, 8, 128, 300
    cache = torch.full((2, num_blocks, bs, hkv, d), float("nan"), dtype=dtype, device="cuda")
    cache[:, :10] = torch.randn_like(cache[:, :10])
    if strided:
        kvx = torch.randn(t, 3 * hkv * d, dtype=dtype, device="cuda")
        k = kvx[:, : hkv * d].view(t, hkv, d)
        v = kvx[:, hkv * d : 2 * hkv * d].view(t, hkv, d)
    else:
        k = torch.randn(t, hkv, d, dtype=dtype, device="cuda")
        v = torch.randn(t, hkv, d, dtype=dtype, device="cuda")
    slots = torch.randperm(num_blocks * bs, device="cuda")[:t]
    slots[torch.rand(t, device="cuda") < 0.2] = -1
    expect = cache.clone()
    write_kv_ref(k, v, expect, slots)
    write_kv(k, v, cache, slots)
    torch.cuda.synchronize()
    assert torch.equal(cache.view(torch.int16), expect.view(torch.int16))


def test_write_kv_unaligned_falls_back() -> None:
    cache = torch.zeros(2, 4, 16, 1, 4, dtype=torch.bfloat16, device="cuda")  # 8-byte rows
    k = torch.randn(5, 1, 4, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(5, 1, 4, dtype=torch.bfloat16, device="cuda")
    slots = torch.tensor([3, -1, 7, 60, 0], device="cuda")
    expect = cache.clone()
    write_kv_ref(k, v, expect, slots)
    write_kv(k, v, cache, slots)
    assert torch.equal(cache, expect)


def test_cuda_graph_replay_at_longer_lengths() -> None:
    """Capture write_kv + decode at short lengths, replay at long ones: equals eager."""
    torch.manual_seed(0)
    dtype, hkv, group, d, bs = torch.bfloat16, 8, 4, 128, 16
    batch, max_len = 8, 8192
    num_blocks = batch * max_len // bs + 1
    dev = torch.device("cuda")
    cache = torch.randn(2, num_blocks, bs, hkv, d, dtype=dtype, device=dev)
    tables = torch.randperm(num_blocks - 1, device=dev)[: batch * max_len // bs].view(batch, -1)
    tables = tables.to(torch.int32).contiguous()
    # Static buffers, refilled before each replay.
    q = torch.randn(batch, hkv * group, d, dtype=dtype, device=dev)
    k_new = torch.randn(batch, hkv, d, dtype=dtype, device=dev)
    v_new = torch.randn(batch, hkv, d, dtype=dtype, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    seq_lens = torch.zeros(batch, dtype=torch.int32, device=dev)
    slots = torch.zeros(batch, dtype=torch.int64, device=dev)
    out = torch.empty_like(q)
    workspace = decode_workspace(dtype, d, batch, hkv * group, hkv, max_len, dev)

    def set_lens(lens: list[int]) -> None:
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        pos = torch.tensor([max(n - 1, 0) for n in lens], device=dev)
        sl = tables[torch.arange(batch, device=dev), pos // bs].long() * bs + pos % bs
        sl[seq_lens == 0] = -1
        slots.copy_(sl)

    md = AttentionMetadata(qsl, seq_lens, tables, slots, max_query_len=1, max_seq_len=max_len)
    params = AttentionParams(d**-0.5)

    def step() -> None:
        write_kv(k_new, v_new, cache, slots)
        paged_attention(q, cache, md, params, out, workspace)

    # The last entry is graph padding: q_len 0 (repeated start), seq_len 0, slot -1.
    qsl.copy_(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7], dtype=torch.int32))
    set_lens([3, 17, 5, 40, 1, 100, 129, 0])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: compile and load modules outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for lens in ([8192, 5000, 2, 4099, 1, 513, 7777, 0], [1, 2, 8000, 3, 4096, 16, 17, 0]):
        set_lens(lens)
        q.normal_()
        k_new.normal_()
        v_new.normal_()
        cache_before = cache.clone()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        replayed, cache_replayed = out.clone(), cache.clone()
        cache.copy_(cache_before)
        out.fill_(float("nan"))
        step()
        torch.cuda.synchronize()
        assert torch.equal(cache_replayed.view(torch.int16), cache.view(torch.int16))
        assert torch.equal(replayed[:-1], out[:-1])  # row 7 belongs to no request
        ref = paged_attention_ref(q.float(), cache.float(), md, params)
        assert torch.isfinite(out[:-1]).all()
        assert (out[:-1].float() - ref[:-1]).abs().max().item() < 2e-2
