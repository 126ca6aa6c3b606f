"""The FP8 GEMV kernels (cuda/fp8_gemv.cu `new`, the first kernel `old`) against the torch
reference: batches 1-8 (old: 1-4), fresh random shapes, per-channel and per-tensor scales,
bias or none, NaN-poisoned outputs (a row or batch entry the kernel skips stays NaN), a
strided x, and the fp8 linear layer picking the GEMV at M <= 8 inside a CUDA graph."""

from __future__ import annotations

import random

import pytest
import torch

from cuda import fp8_gemv as g
from worker.quant.fp8 import fp8_linear, quantize_weight_per_channel, quantize_weight_per_tensor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = torch.device("cuda")


def weights(n: int, k: int, per_tensor: bool, gen: torch.Generator):
    w = torch.randn(n, k, device=DEV, generator=gen) * 0.05
    w[:, 5] *= 30  # an outlier column: per-channel scales differ row to row
    if per_tensor:
        wq, s = quantize_weight_per_tensor(w)
        return wq, s.reshape(1)
    return quantize_weight_per_channel(w)


def check(m: int, n: int, k: int, mode: str, per_tensor: bool, dtype, bias: bool, seed: int):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    wq, ws = weights(n, k, per_tensor, gen)
    x = torch.randn(m, k, device=DEV, dtype=dtype, generator=gen)
    b = torch.randn(n, device=DEV, dtype=dtype, generator=gen) if bias else None
    assert g.gemv_ok(x, wq, mode)
    out = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)
    g.fp8_gemv(x, wq, ws, b, out=out, mode=mode)
    want = g.fp8_gemv_ref(x, wq, ws, b).float()
    got = out.float()
    assert bool(torch.isfinite(got).all()), (m, n, k, mode)
    err = (got - want).abs().max() / want.abs().max().clamp(min=1e-6)
    assert float(err) < 1e-2, (m, n, k, mode, per_tensor, float(err))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("mode", ["new", "old"])
def test_gemv_matches_reference(mode: str, per_tensor: bool, dtype: torch.dtype) -> None:
    rng = random.Random(hash((mode, per_tensor, str(dtype))) & 0xFFFF)
    fixed = [(4096, 6144), (14336, 4096), (4096, 28672 // 8), (8192, 1280), (16, 3)]
    for m in range(1, g.MAX_ROWS[mode] + 1):
        shapes = fixed + [(16 * rng.randint(1, 600), rng.randint(1, 3000)) for _ in range(2)]
        for i, (k, n) in enumerate(shapes):
            check(m, n, k, mode, per_tensor, dtype, bias=i % 2 == 1, seed=rng.randrange(1 << 30))


def test_gemv_strided_x_and_out() -> None:
    gen = torch.Generator(device=DEV).manual_seed(7)
    k, n = 1024, 777
    wq, ws = weights(n, k, False, gen)
    big = torch.randn(6, 2 * k, device=DEV, dtype=torch.bfloat16, generator=gen)
    x = big[:, k:]  # row stride 2k: 16-byte aligned rows
    out_big = torch.full((6, n + 9), float("nan"), device=DEV, dtype=torch.bfloat16)
    out = out_big[:, :n]
    g.fp8_gemv(x, wq, ws, None, out=out, mode="new")
    torch.testing.assert_close(
        out.float(), g.fp8_gemv_ref(x, wq, ws, None).float(), rtol=1e-2, atol=1e-2
    )
    assert bool(out_big[:, n:].isnan().all())  # nothing written past the view


def test_linear_uses_gemv_up_to_8_rows_in_a_graph() -> None:
    if g.MODE != "new":
        pytest.skip(f"HEADRACE_FP8_GEMV={g.MODE}: the graph test is for the new kernel")
    gen = torch.Generator(device=DEV).manual_seed(3)
    k, n = 4096, 1536
    wq, ws = weights(n, k, False, gen)
    for m in (1, 8):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16, generator=gen)
        assert g.gemv_ok(x, wq)
        eager = fp8_linear(x, wq, ws, None, None)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = fp8_linear(x, wq, ws, None, None)
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, eager, rtol=0, atol=0)
        # Weight-only math: x not rounded to FP8 (W8A8 would differ by ~1%).
        want = g.fp8_gemv_ref(x, wq, ws, None).float()
        assert float((y.float() - want).abs().max() / want.abs().max()) < 1e-2
