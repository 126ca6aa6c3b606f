"""CPU attention (worker/cpu_attention.py): the reference's results, at a cost that grows
with the work instead of with the score matrices; and the CPU's per-step token budget
sized so a long prompt cannot freeze a running stream."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from cuda.paged_attention import paged_attention_ref
from worker.attention import AttentionMetadata, AttentionParams, TorchAttention
from worker.config import SchedulerConfig
from worker.cpu_attention import paged_attention_sdpa
from worker.kv_cache import KVCacheManager
from worker.request import Request
from worker.scheduler import Scheduler


def _batch(
    q_lens: list[int], seq_lens: list[int], hq: int = 8, hkv: int = 2, d: int = 32, bs: int = 16
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(sum(q_lens) + len(seq_lens))
    max_blocks = max(-(-s // bs) for s in seq_lens)
    num_blocks = max_blocks * len(seq_lens) + 3
    kv = torch.randn(2, num_blocks, bs, hkv, d, generator=g)
    perm = torch.randperm(num_blocks, generator=g)[: max_blocks * len(seq_lens)]
    tables = perm.view(len(seq_lens), max_blocks).int()  # scattered, as in a real cache
    q = torch.randn(sum(q_lens), hq, d, generator=g)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, kv, qsl, torch.tensor(seq_lens, dtype=torch.int32), tables


@pytest.mark.parametrize(("window", "fp8"), [(None, False), (7, False), (None, True)])
def test_sdpa_matches_the_reference(window: int | None, fp8: bool) -> None:
    # A decode, a fresh prefill, a chunk after a cached prefix, and an empty row.
    q, kv, qsl, seq_lens, tables = _batch([1, 37, 20, 0, 1], [50, 37, 61, 9, 1])
    params = AttentionParams(0.17, window, *((0.5, 2.0) if fp8 else ()))
    if fp8:
        kv = kv.to(torch.float8_e4m3fn)
    md = AttentionMetadata(qsl, seq_lens, tables, torch.empty(0, dtype=torch.int64), 37, 61)
    ref = paged_attention_ref(q, kv, md, params)
    got = paged_attention_sdpa(q, kv, md, params)
    live = torch.ones(q.shape[0], dtype=torch.bool)
    torch.testing.assert_close(got[live], ref[live], atol=2e-5, rtol=1e-4)


def _prefill_time(fn: object, total: int, chunk: int = 512, reps: int = 3) -> float:
    """Best of `reps`: a `total`-token prompt prefilled in `chunk`-token steps (SmolLM2's
    9 query heads, 3 KV heads, head dim 64)."""
    hq, hkv, d, bs = 9, 3, 64, 16
    nb = -(-total // bs)
    kv = torch.randn(2, nb, bs, hkv, d)
    tables = torch.arange(nb, dtype=torch.int32)[None]
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            q = torch.randn(n, hq, d)
            qsl = torch.tensor([0, n], dtype=torch.int32)
            md = AttentionMetadata(qsl, torch.tensor([start + n], dtype=torch.int32), tables,
                                   torch.full((n,), -1, dtype=torch.int64), n, start + n)  # fmt: skip
            fn(q, q[:, :hkv], q[:, :hkv], kv, md, AttentionParams(0.125))  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def _reference(q, k, v, kv_cache, md, params):  # type: ignore[no-untyped-def]
    return paged_attention_ref(q, kv_cache, md, params)


def test_cpu_backend_scales_with_work() -> None:
    torch.set_num_threads(1)  # comparable on any machine, and CI has 2 cores
    backend = TorchAttention()
    # Interleaved best-of runs, so a busy machine slows both sides alike.
    short = long = reference = float("inf")
    for _ in range(4):
        short = min(short, _prefill_time(backend, 1024, reps=1))
        long = min(long, _prefill_time(backend, 4096, reps=1))
        reference = min(reference, _prefill_time(_reference, 4096, reps=1))
    # In 512-token chunks, 4x the tokens is 12x the attention work (sum of chunk x context).
    # The einsum reference takes ~16x (its score matrices outgrow the caches); SDPA tracks
    # the work. Loose bound on a shared machine; the speedup below is the sharp check.
    assert long / short < 16, (short, long)
    assert reference / long > 1.4, (reference, long)


def test_cpu_default_budget_is_sized_for_latency(stories_path: Path) -> None:
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    engine = EngineCore(EngineConfig(model=str(stories_path), device="cpu"))
    assert engine.scheduler.config.max_num_batched_tokens == 512


def test_long_prompt_never_stalls_a_running_stream() -> None:
    """With the CPU budget, a 4,000-token prompt is prefilled in chunks and the running
    stream computes a token in every one of those steps."""
    kv = KVCacheManager(1000, 16, enable_caching=False)
    sched = Scheduler(SchedulerConfig(256, 512, 8192), kv)
    from ipc.messages import SamplingParams

    params = SamplingParams(max_tokens=1000, ignore_eos=True)
    stream = Request("stream", [1, 2, 3], params, 1000, frozenset())
    sched.add_request(stream)
    out = sched.schedule()
    sched.update(out, [[7]])
    sched.add_request(Request("long", list(range(4000)), params, 1000, frozenset()))
    steps = 0
    while sched.requests["long"].num_output_tokens == 0:
        out = sched.schedule()
        ids = [sr.request.request_id for sr in out.scheduled]
        assert "stream" in ids and out.num_batched_tokens <= 512
        sched.update(out, [[7] if sr.samples else [] for sr in out.scheduled])
        steps += 1
    assert steps == -(-4000 // 511)  # 511 prompt tokens per step beside the stream's one
