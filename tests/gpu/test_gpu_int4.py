"""W4A16 kernels on the GPU against the dequantize-then-matmul reference: fresh random
shapes and group sizes, poisoned outputs, both activation dtypes, desc_act gathers, and a
CUDA graph replay equal to eager."""

from __future__ import annotations

import random

import pytest
import torch

from cuda import int4_gemm as ig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def random_weight(n: int, k: int, group_size: int, perm: bool, seed: int) -> ig.Int4Weight:
    g = torch.Generator().manual_seed(seed)
    groups = k // group_size
    w = ig.Int4Weight(
        qw=ig.pack_rows(torch.randint(0, 16, (n, k), generator=g)),
        scales=(torch.rand(n, groups, generator=g) * 0.02 + 0.001).half(),
        zeros=torch.randint(0, 16, (n, groups), generator=g).to(torch.uint8),
        group_size=group_size,
        perm=torch.randperm(k, generator=g) if perm else None,
    )
    return w.to(torch.device("cuda"))


def check(y: torch.Tensor, x: torch.Tensor, w: ig.Int4Weight) -> None:
    ref = ig.int4_linear_ref(x.float(), w)  # fp32 reference
    low = ig.int4_linear_ref(x, w).float()  # the same in the activation dtype
    assert not torch.isnan(y).any(), "an output element was not written"
    err, base = (y.float() - ref).abs().max().item(), (low - ref).abs().max().item()
    assert err <= 2 * base + 1e-3 * ref.abs().max().item(), (err, base)


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
    eager = ig.int4_linear(x, w).clone()
    ig.int4_linear(x, w, out=y)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ig.int4_linear(x, w, out=y)
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    check(y, x, w)


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
    eager = ig.int4_linear(x, w).clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ig.int4_linear(x, w, out=y)
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)
