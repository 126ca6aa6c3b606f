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


# ---- the split-K GEMV (cuda/int4_gemv.cu): every variant, forced splits, loader layouts ----


def gpu_weight(n: int, k: int, group_size: int, perm: bool, seed: int) -> ig.Int4Weight:
    """random_weight made on the GPU (any int32 is 8 valid nibbles): big shapes in ms."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    groups = k // group_size
    return ig.Int4Weight(
        qw=torch.randint(-(2**31), 2**31 - 1, (n, k // 8), generator=g, device="cuda").int(),
        scales=(torch.rand(n, groups, generator=g, device="cuda") * 0.02 + 0.001).half(),
        zeros=torch.randint(0, 17, (n, groups), generator=g, device="cuda").to(torch.uint8),
        group_size=group_size,
        perm=torch.randperm(k, generator=g, device="cuda") if perm else None,
    )


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


LOADER_FORMATS = [
    ("awq", dict(group_size=128)),
    ("awq", dict(group_size=64)),
    ("gptq", dict(group_size=128, sym=True)),
    ("gptq", dict(group_size=32, sym=False)),
    ("gptq", dict(group_size=64, sym=False, desc_act=True)),
    ("gptq", dict(group_size=-1, sym=True)),
]


@pytest.mark.parametrize(("method", "kwargs"), LOADER_FORMATS)
def test_split_gemv_on_weights_as_the_loader_stores_them(method: str, kwargs: dict) -> None:
    """AWQ / GPTQ tensors packed from the formats' definitions, repacked by the loader's
    to_rows (desc_act: a perm), through int4_linear, against the encoded fp32 weight."""
    from tests.int4_checkpoints import quantized_pair
    from worker.quant.int4 import Int4Config
    from worker.quant.int4_repack import to_rows

    g = torch.Generator().manual_seed(len(method) + kwargs["group_size"])
    n, k = 768, 1024
    parts, w_deq = quantized_pair(torch.randn(n, k, generator=g) * 0.02, method, seed=5, **kwargs)
    qc = {"quant_method": method, "bits": 4, "group_size": kwargs["group_size"]}
    qc |= {"sym": kwargs.get("sym", False), "desc_act": kwargs.get("desc_act", False)}
    w = to_rows(parts, Int4Config.from_hf(qc), "layer").to(torch.device("cuda"))
    assert (w.perm is not None) == kwargs.get("desc_act", False)
    for m in (1, 3, 8):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        y = ig.int4_linear(x, w, out=out)
        torch.cuda.synchronize()
        check(y, x, w)
        want = x.float() @ w_deq.cuda().t()
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
    eager = ig.int4_linear(x, w).clone()
    ig.int4_linear(x, w, out=y)
    torch.cuda.synchronize()
    assert torch.equal(y, eager), "split sums are deterministic"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ig.int4_linear(x, w, out=y)
    for _ in range(2):
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    check(y, x, w)
