"""W4A16 kernels on the GPU against the dequantize-then-matmul reference: fresh random
shapes and group sizes, poisoned outputs, both activation dtypes, desc_act gathers, and a
CUDA graph replay equal to eager."""

from __future__ import annotations

import random

import pytest
import torch

from cuda import int4_gemm as ig
from tests.gpu.int4_helpers import (
    LOADER_FORMATS,
    assert_graph_replays_eager,
    check,
    gpu_weight,
    loader_weight,
    random_weight,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("seed", range(12))
def test_gemv_and_dequant_paths_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    dtype = rng.choice([torch.bfloat16, torch.float16])
    k = rng.choice([256, 576, 4096, 14336])
    group_size = rng.choice([g for g in (32, 64, 128, k) if k % g == 0])
    n = rng.choice([1, 15, 100, 4096, 6144 + rng.randrange(0, 32)])
    m = rng.choice([1, 2, 3, 4, 5, 17, 300])
    w = random_weight(n, k, group_size, perm=rng.random() < 0.3, seed=seed)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype) if m <= 4 else None
    y = ig.int4_linear(x, w, out=out)
    torch.cuda.synchronize()
    check(y, x, w)


def test_graph_replay_equals_eager() -> None:
    w = random_weight(4096, 4096, 128, perm=False, seed=99)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert_graph_replays_eager(lambda out: ig.int4_linear(x, w, out=out), x, y, w)


@pytest.mark.parametrize("seed", range(12))
def test_tiles_layout_matches_reference(seed: int) -> None:
    """gemv_tiles (1-8 rows, and chunks of 8), dequant_tiles (prefill) on the tiles layout."""
    rng = random.Random(100 + seed)
    dtype = rng.choice([torch.bfloat16, torch.float16])
    k = rng.choice([64, 576, 4096, 14336])
    group_size = rng.choice([g for g in (64, 128, k) if k % g == 0])
    n = rng.choice([16, 112, 4096, 6144 + 16 * rng.randrange(0, 4)])
    m = rng.choice([1, 2, 3, 5, 8, 8, 11, 32, 300])
    w = random_weight(n, k, group_size, perm=rng.random() < 0.3, seed=seed).as_tiles()
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    gemv = m <= ig.TILE_GEMV_MAX_ROWS
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype) if gemv else None
    y = ig.int4_linear(x, w, out=out)
    torch.cuda.synchronize()
    check(y, x, w)


def test_tiles_graph_replay_equals_eager() -> None:
    w = random_weight(4096, 4096, 128, perm=False, seed=98).as_tiles()
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(8, 4096, device="cuda", dtype=torch.bfloat16)
    assert_graph_replays_eager(lambda out: ig.int4_linear(x, w, out=out), x, y, w)


# ---- the split-K GEMV (cuda/int4_gemv.cu): every variant, forced splits, loader layouts ----


@pytest.mark.parametrize("seed", range(16))
def test_split_gemv_every_variant_matches_reference(seed: int) -> None:
    """Each instantiated variant for a fresh shape, M in 1..8, group 32/64/128/K, with the
    fewest splits and with forced extra splits (the last-block sum), outputs poisoned."""
    from cuda import int4_gemv as sk

    rng = random.Random(1000 + seed)
    dtype = rng.choice([torch.bfloat16, torch.float16])
    k = 32 * rng.choice([1, 7, 18, 64, 128, 200, 448])
    group_size = rng.choice([g for g in (32, 64, 128, k) if k % g == 0])
    n = rng.choice([1, 15, 40, 333, 4096, 6144 + rng.randrange(0, 40)])
    m = rng.randint(1, 8)
    w = gpu_weight(n, k, group_size, perm=False, seed=seed)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    for rows, wk in sk.VARIANTS[sk.m_template(m)]:
        fewest = sk.split_plan(n, k, m, rows, wk)
        for plan in (fewest, sk.split_plan(n, k, m, rows, wk, fewest.splits + rng.randint(1, 8))):
            assert plan.fits(n, m), plan
            y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            sk.gemv(x, w, y, plan)
            torch.cuda.synchronize()
            check(y, x, w)
    _, counters = sk.workspace(x.device)
    assert not counters.any(), "the last block of every tile resets its counter"


@pytest.mark.parametrize("impl", ["split", "old"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8])
def test_gemv_impls_match_reference_for_every_row_count(
    impl: str, m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ig, "GEMV_IMPL", impl)
    for n, k, group_size in ((4096, 14336, 128), (1000, 576, 64), (6144, 4096, 32)):
        w = gpu_weight(n, k, group_size, perm=m == 5, seed=m + n)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        y = ig.int4_linear(x, w, out=out)
        torch.cuda.synchronize()
        assert y is out
        check(y, x, w)


@pytest.mark.parametrize(("method", "kwargs"), LOADER_FORMATS)
def test_split_gemv_on_weights_as_the_loader_stores_them(method: str, kwargs: dict) -> None:
    """AWQ / GPTQ tensors as the loader stores them, through int4_linear, against the
    encoded fp32 weight."""
    w, w_deq = loader_weight(method, kwargs)
    n, k = w.out_features, w.in_features
    for m in (1, 3, 8):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        y = ig.int4_linear(x, w, out=out)
        torch.cuda.synchronize()
        check(y, x, w)
        want = x.float() @ w_deq.t()
        assert (y.float() - want).abs().max() <= 0.02 * want.abs().max()


def test_split_gemv_graph_replay_equals_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """A split launch (the last-block sum and its counters) replayed in a graph: equal to
    eager bit for bit, twice, and right for new inputs."""
    from cuda import int4_gemv as sk

    monkeypatch.setattr(ig, "GEMV_IMPL", "split")

    w = gpu_weight(4096, 14336, 128, perm=False, seed=97)
    x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    assert sk.choose(4096, 14336, 1, sk._sms(x.device)).splits > 1
    y = torch.empty(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert_graph_replays_eager(lambda out: ig.int4_linear(x, w, out=out), x, y, w)
