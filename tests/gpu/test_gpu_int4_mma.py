"""The tensor-core int4 GEMV (cuda/int4_mma_gemv.cu) on the GPU against the
dequantize-then-matmul reference: every variant on fresh shapes, 1-8 rows, group sizes
128 / 256 / K (GPTQ's -1), both activation dtypes, poisoned outputs, strided x; the
int4_linear default path for 1-40 rows and desc_act; group 64's fallback; graphs."""

from __future__ import annotations

import random

import pytest
import torch

from cuda import int4_gemm as ig
from cuda import int4_mma_gemv as mg
from tests.gpu.int4_helpers import assert_graph_replays_eager, check, gpu_weight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("seed", range(16))
def test_every_variant_matches_reference(seed: int) -> None:
    rng = random.Random(2000 + seed)
    dtype = rng.choice([torch.bfloat16, torch.float16])
    k = 128 * rng.choice([1, 3, 7, 32, 112, 224])
    group_size = rng.choice([g for g in (128, 256, k) if k % g == 0])
    n = rng.choice([1, 15, 16, 40, 333, 4096, 6144 + rng.randrange(0, 40)])
    m = rng.randint(1, 8)
    w = gpu_weight(n, k, group_size, perm=False, seed=seed)
    wide = torch.randn(m, k + 64, device="cuda", dtype=dtype)
    x = wide[:, 32 : 32 + k] if rng.random() < 0.5 else wide[:, :k].contiguous()  # strided x
    ref = ig.int4_linear_ref(x.float(), w)  # check()'s bound, computed once for all variants
    base = (ig.int4_linear_ref(x, w).float() - ref).abs().max().item()
    for variant in mg.VARIANTS:
        y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        mg.gemv(x, w, y, variant)
        torch.cuda.synchronize()
        assert not torch.isnan(y).any(), (variant, "an output element was not written")
        err = (y.float() - ref).abs().max().item()
        assert err <= 2 * base + 1e-3 * ref.abs().max().item(), (variant, err, base)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16, 17, 32, 40])
def test_int4_linear_default_path(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 rows a launch up to 32 rows, then dequantize + cuBLAS; desc_act's gather."""
    monkeypatch.setattr(ig, "GEMV_IMPL", "mma")
    for n, k, group_size in ((4096, 14336, 128), (1000, 1024, 1024), (6144, 4096, 128)):
        w = gpu_weight(n, k, group_size, perm=m in (3, 17), seed=m + n)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        y = ig.int4_linear(x, w, out=out if m <= ig.MMA_MAX_ROWS else None)
        torch.cuda.synchronize()
        check(y, x, w)


def test_group_64_falls_back_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ig, "GEMV_IMPL", "mma")
    monkeypatch.setattr(mg, "gemv", lambda *a, **k: pytest.fail("mma GEMV on group 64"))
    w = gpu_weight(4096, 4096, 64, perm=False, seed=7)
    x = torch.randn(2, 4096, device="cuda", dtype=torch.float16)
    out = torch.full((2, 4096), float("nan"), device="cuda", dtype=torch.float16)
    check(ig.int4_linear(x, w, out=out), x, w)


def test_large_activations_stay_finite() -> None:
    """fp32 accumulation: |x| near 1000 (Llama's down_proj inputs can be) does not overflow,
    where 16 products summed in fp16 would (16 x 1000 x 15 > 65504)."""
    w = gpu_weight(4096, 14336, 128, perm=False, seed=8)
    x = (torch.randn(1, 14336, device="cuda") * 300).to(torch.float16)
    y = torch.full((1, 4096), float("nan"), device="cuda", dtype=torch.float16)
    mg.gemv(x, w, y)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    check(y, x, w)


@pytest.mark.parametrize("m", [1, 8])
def test_graph_replay_equals_eager(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ig, "GEMV_IMPL", "mma")
    w = gpu_weight(4096, 14336, 128, perm=False, seed=96)
    x = torch.randn(m, 14336, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, 4096, device="cuda", dtype=torch.bfloat16)
    assert_graph_replays_eager(lambda out: ig.int4_linear(x, w, out=out), x, y, w)
