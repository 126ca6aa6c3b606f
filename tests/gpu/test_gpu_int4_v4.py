"""Round 4 of the int4 GEMV (cuda/int4_v4_gemv.cu, HEADRACE_INT4_GEMV=v4) on the GPU against
the dequantize-then-matmul reference: every variant on fresh shapes, 1-8 rows, groups 64 /
128 / 256 / K, both activation dtypes, poisoned outputs, strided x; int4_linear on the
stream layout for 1-40 rows (prefill: v4_dequant_rows) and desc_act's gather; AWQ and GPTQ
weights as the loader stores them; graphs replay equal to eager."""

from __future__ import annotations

import random
from functools import partial

import pytest
import torch

from cuda import int4_gemm as ig
from cuda import int4_v4_gemv as v4
from tests.gpu.int4_helpers import (
    LOADER_FORMATS,
    assert_graph_replays_eager,
    check,
    gpu_weight,
    loader_weight,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("seed", range(12))
def test_every_variant_matches_reference(seed: int) -> None:
    rng = random.Random(4000 + seed)
    dtype = rng.choice([torch.bfloat16, torch.float16])
    k = 128 * rng.choice([1, 3, 7, 32, 112, 224])
    group_size = rng.choice([g for g in (64, 128, 256, k) if k % g == 0 and v4.supported(16, k, g)])
    n = 16 * rng.choice([1, 3, 25, 256, 384 + rng.randrange(0, 5)])
    m = rng.randint(1, 8)
    w = gpu_weight(n, k, group_size, perm=False, seed=seed).as_stream()
    wide = torch.randn(m, k + 64, device="cuda", dtype=dtype)
    x = wide[:, 32 : 32 + k] if rng.random() < 0.5 else wide[:, :k].contiguous()  # strided x
    ref = ig.int4_linear_ref(x.float(), w)  # check()'s bound, computed once for all variants
    base = (ig.int4_linear_ref(x, w).float() - ref).abs().max().item()
    for variant in v4.VARIANTS:
        y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        v4.gemv(x, w, y, variant)
        torch.cuda.synchronize()
        assert not torch.isnan(y).any(), (variant, "an output element was not written")
        err = (y.float() - ref).abs().max().item()
        assert err <= 2 * base + 1e-3 * ref.abs().max().item(), (variant, err, base)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16, 17, 32, 33, 40])
def test_int4_linear_on_the_stream_layout(m: int) -> None:
    """8 rows a launch up to 32 rows, then v4_dequant_rows + cuBLAS; desc_act's gather."""
    for n, k, group_size in ((4096, 14336, 128), (1008, 1024, 64), (6144, 4096, 128)):
        w = gpu_weight(n, k, group_size, perm=m in (3, 17, 33), seed=m + n).as_stream()
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        y = ig.int4_linear(x, w, out=out if m <= ig.MMA_MAX_ROWS else None)
        torch.cuda.synchronize()
        check(y, x, w)


def test_dequant_kernel_equals_the_reference() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        for group_size in (64, 128, 1024):
            w = gpu_weight(48, 1024, group_size, perm=False, seed=group_size).as_stream()
            out = torch.full((48, 1024), float("nan"), device="cuda", dtype=dtype)
            got = ig.dequantize(w, dtype, out)
            torch.cuda.synchronize()
            assert torch.equal(got, ig.dequantize_ref(w, dtype))


@pytest.mark.parametrize(("method", "kwargs"), LOADER_FORMATS)
def test_on_weights_as_the_loader_stores_them(method: str, kwargs: dict) -> None:
    """AWQ / GPTQ (desc_act included) repacked into the stream layout where it applies;
    group 32 has none (the rows layout and the default GEMV keep it)."""
    w, w_deq = loader_weight(method, kwargs)
    n, k = w.out_features, w.in_features
    if not v4.supported(n, k, w.group_size):
        assert w.group_size == 32
        with pytest.raises(ValueError, match="no stream layout"):
            w.as_stream()
        return
    w = w.as_stream()
    for m in (1, 3, 8):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        y = ig.int4_linear(x, w, out=out)
        torch.cuda.synchronize()
        check(y, x, w)
        want = x.float() @ w_deq.t()
        assert (y.float() - want).abs().max() <= 0.02 * want.abs().max()


def test_large_activations_stay_finite() -> None:
    """fp32 accumulation: |x| near 1000 in fp16 does not overflow."""
    w = gpu_weight(4096, 14336, 128, perm=False, seed=8).as_stream()
    x = (torch.randn(1, 14336, device="cuda") * 300).to(torch.float16)
    y = torch.full((1, 4096), float("nan"), device="cuda", dtype=torch.float16)
    v4.gemv(x, w, y)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    check(y, x, w)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 4096, 14336), (8, 4096, 14336), (1, 28672, 4096)])
def test_graph_replay_equals_eager(m: int, n: int, k: int) -> None:
    """WK = 16 (the block sum) and WK = 2 by the rule on an H200 (8B down, gate_up)."""
    w = gpu_weight(n, k, 128, perm=False, seed=96 + m).as_stream()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    assert_graph_replays_eager(lambda out: ig.int4_linear(x, w, out=out), x, y, w)


def test_graph_replay_of_every_variant() -> None:
    w = gpu_weight(2048, 4096, 128, perm=False, seed=95).as_stream()
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    for variant in v4.VARIANTS:
        y = torch.empty(2, 2048, device="cuda", dtype=torch.bfloat16)
        assert_graph_replays_eager(partial(run_variant, x, w, variant), x, y, w)


def run_variant(
    x: torch.Tensor, w: ig.Int4Weight, variant: tuple[int, int], y: torch.Tensor
) -> None:
    v4.gemv(x, w, y, variant)
