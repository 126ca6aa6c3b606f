"""The FP8 GEMV's launch math on the CPU (cuda/fp8_gemv.py `plan`, cuda/fp8_gemv.cu): an
emulation of the new kernel's block/thread/chunk indexing computes the same y as the
reference and touches every weight chunk of every row exactly once; mode parsing."""

from __future__ import annotations

import random

import pytest
import torch

from cuda import fp8_gemv as g
from worker.quant.fp8 import quantize_weight_per_channel


def emulate_v2(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, scale_stride: int):
    """fp8_gemv.cu's gemv<M> step by step (threads vectorized), and the visit counts."""
    m, k = x.shape
    n = wq.shape[0]
    p = g.plan(m, n)
    rows, unroll = g.tile(m)
    assert (p.rows, p.unroll, p.threads) == (rows, unroll, g.THREADS)
    chunks = k // 16
    wf = wq.float().reshape(n, chunks, 16)
    xf = x.float().reshape(m, chunks, 16)
    y = torch.full((m, n), float("nan"))
    visits = torch.zeros(n, chunks, dtype=torch.int64)
    for b in range(p.grid):
        n0 = b * rows
        acc = torch.zeros(rows, m)
        for t in range(p.threads):
            c0 = t
            while c0 < chunks:
                for u in range(unroll):
                    c = c0 + u * p.threads
                    if c >= chunks:
                        continue
                    for r in range(rows):
                        row = min(n0 + r, n - 1)
                        if n0 + r < n:
                            visits[row, c] += 1
                        acc[r] += (xf[:, c] * wf[row, c]).sum(-1)
                c0 += p.threads * unroll
        for i in range(rows * m):
            r, mm = divmod(i, m)
            if n0 + r < n:
                y[mm, n0 + r] = acc[r, mm] * ws.reshape(-1)[(n0 + r) * scale_stride]
    return y, visits


@pytest.mark.parametrize("seed", range(4))
def test_emulated_kernel_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    m = rng.randint(1, 8)
    n = rng.choice([1, 3, rng.randint(2, 40)])
    k = 16 * rng.choice([1, 7, rng.randint(1, 300)])  # < and > one round of 128 threads
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    wq, ws = quantize_weight_per_channel(torch.randn(n, k, generator=gen))
    per_tensor = seed % 2 == 1
    if per_tensor:
        ws = ws[:1].clone()
    y, visits = emulate_v2(x, wq, ws, 0 if per_tensor else 1)
    assert bool((visits == 1).all())
    want = g.fp8_gemv_ref(x, wq, ws, None).float()
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


def test_plans() -> None:
    assert g.plan(1, 4096) == g.Plan("fp8_gemv_v2_m1", 1024, 128, 4, 2)
    assert g.plan(8, 4097) == g.Plan("fp8_gemv_v2_m8", 513, 128, 8, 1)
    assert g.plan(3, 6144, "old") == g.Plan("fp8_gemv_m3", 384, 256, 16, 2)


def test_mode_parsing() -> None:
    assert g.gemv_mode("new") == g.gemv_mode("1") == "new"
    assert g.gemv_mode("OLD") == "old" and g.gemv_mode("off") == "0"
    with pytest.raises(ValueError, match="HEADRACE_FP8_GEMV"):
        g.gemv_mode("fast")


def test_cpu_tensors_take_the_reference() -> None:
    x = torch.randn(2, 32)
    wq, ws = quantize_weight_per_channel(torch.randn(5, 32))
    assert not g.gemv_ok(x, wq)
    torch.testing.assert_close(g.fp8_gemv(x, wq, ws, None), g.fp8_gemv_ref(x, wq, ws, None))
