"""Round 2 of the decode GEMV (cuda/gemv_step.cu) and the fused batch-1 layer on the GPU:
each kernel against its torch reference on fresh random shapes (poisoned outputs, bf16 and
fp16, every bench variant), and generation with the fusions against the unfused cuBLAS path."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from cuda import gemv_step
from tests.test_golden import check_logprobs_close, prompts_of_different_lengths
from tests.tiny_models import tiny_model_hd64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = "cuda"
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
DTYPES = [torch.bfloat16, torch.float16]
# (N, K): the 8B model's q/k/v, o and down, and sizes that are not multiples of a warp's
# rows, of 32 lanes x U chunks, or of the grid.
SHAPES = [(6144, 4096), (4096, 4096), (4096, 14336), (1003, 4104), (37, 72), (4097, 8), (130, 520)]


def _poisoned(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype, device=DEV)


def _check(
    got: torch.Tensor, want64: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> None:
    """got within one rounding of the fp64 value plus fp32 sum error (scale = sum |x w|)."""
    assert not got.isnan().any(), "unwritten (NaN) outputs"
    err = (got.double() - want64).abs()
    bound = ULP[dtype] * want64.abs() + 1e-5 * scale.double() + 1e-6
    assert (err <= bound).all(), float(err.max())


def _case(seed: int, n: int, k: int, dtype: torch.dtype, max_m: int) -> dict[str, Any]:
    rng = random.Random(seed)
    m = rng.randint(1, max_m)
    return {
        "m": m,
        "w": (torch.randn(n, k, device=DEV) * 0.05).to(dtype),
        "bias": torch.randn(n, device=DEV).to(dtype) if rng.random() < 0.5 else None,
        "residual": torch.randn(m, n, device=DEV).to(dtype) if rng.random() < 0.6 else None,
    }


# every bench variant in bf16, the default one in fp16 (fewer modules to compile)
CASES = [(torch.bfloat16, v) for v in gemv_step.VARIANTS] + [
    (torch.float16, gemv_step.DEFAULT_VARIANT)
]


@pytest.mark.parametrize(("dtype", "variant"), CASES)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_gemv2_matches_reference(
    n: int, k: int, dtype: torch.dtype, variant: tuple[int, int]
) -> None:
    c = _case(n * 31 + k + variant[0], n, k, dtype, 8)
    m, w, b, res = c["m"], c["w"], c["bias"], c["residual"]
    x = torch.randn(m, k, device=DEV).to(dtype)
    assert gemv_step.supported("", x, w, b, res)
    got = gemv_step.gemv2(x, w, b, res, out=_poisoned(m, n, dtype), variant=variant)
    y = x.double() @ w.double().t() + (0 if b is None else b.double())
    scale = x.double().abs() @ w.double().abs().t()
    if res is None:
        _check(got, y, scale, dtype)
    else:  # one rounding of the sum, then the add's: compare with the reference's roundings
        want = gemv_step.gemv2_ref(x, w, b, res)
        tol = 2 * ULP[dtype] * (want.double().abs() + res.double().abs()) + 1e-5 * scale + 1e-6
        assert ((got.double() - want.double()).abs() <= tol).all()
    # a row's result does not depend on the batch it is in, nor on the variant
    one = gemv_step.gemv2(x[:1].contiguous(), w, b, None if res is None else res[:1].contiguous())
    assert torch.equal(one[0], got[0])
    assert torch.equal(gemv_step.gemv2(x, w, b, res), got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (28672, 4096), (1003, 4104), (37, 72)])
def test_gemv2_norm_matches_reference(n: int, k: int, dtype: torch.dtype) -> None:
    c = _case(n + 7 * k, n, k, dtype, 4)
    m, w, b, res = c["m"], c["w"], c["bias"], c["residual"]
    h = (torch.randn(m, k, device=DEV) * 3).to(dtype)
    nw = (1 + 0.2 * torch.randn(k, device=DEV)).to(dtype)
    assert gemv_step.supported("norm", h, w, b, res, nw)
    got = gemv_step.run("norm", h, w, b, res, nw, 1e-5, out=_poisoned(m, n, dtype))
    assert not got.isnan().any(), "unwritten (NaN) outputs"
    want = gemv_step.gemv2_norm_ref(h, nw, 1e-5, w, b, res)
    # rstd's sum of squares runs in another order: one ulp of a normed element at most
    normed = gemv_step.add_rms_norm_ref(h, None, nw, 1e-5)[0]
    scale = normed.double().abs() @ w.double().abs().t()
    extra = 0.0 if res is None else res.double().abs()
    tol = 2 * ULP[dtype] * (want.double().abs() + scale + extra) + 1e-6
    assert ((got.double() - want.double()).abs() <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(4096, 14336), (1003, 4104), (37, 72), (4097, 8)])
def test_gemv2_silu_matches_reference(n: int, k: int, dtype: torch.dtype) -> None:
    c = _case(n + 3 * k, n, k, dtype, 2 if k * 4 <= gemv_step.MAX_SHMEM else 1)
    m, w, b, res = c["m"], c["w"], c["bias"], c["residual"]
    gate_up = (torch.randn(m, 2 * k, device=DEV) * 2).to(dtype)
    assert gemv_step.supported("silu", gate_up, w, b, res)
    got = gemv_step.run("silu", gate_up, w, b, res, out=_poisoned(m, n, dtype))
    want = gemv_step.gemv2_silu_ref(gate_up, w, b, res)  # the same activation, bit for bit
    act = gemv_step.silu_and_mul_ref(gate_up)
    scale = act.double().abs() @ w.double().abs().t()
    extra = 0.0 if res is None else res.double().abs()
    assert not got.isnan().any(), "unwritten (NaN) outputs"
    tol = 2 * ULP[dtype] * (want.double().abs() + extra) + 1e-5 * scale + 1e-6
    assert ((got.double() - want.double()).abs() <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(28672, 4096), (1004, 4104), (38, 72), (2, 8)])
def test_gemv2_norm_pair_matches_reference(n: int, k: int, dtype: torch.dtype) -> None:
    c = _case(n + 5 * k, n, k, dtype, 4)
    m, w, b = c["m"], c["w"], c["bias"]
    h = (torch.randn(m, k, device=DEV) * 3).to(dtype)
    nw = (1 + 0.2 * torch.randn(k, device=DEV)).to(dtype)
    assert gemv_step.supported("norm_pair", h, w, b, None, nw)
    got = gemv_step.run("norm_pair", h, w, b, None, nw, 1e-5, out=_poisoned(m, n // 2, dtype))
    assert not got.isnan().any(), "unwritten (NaN) outputs"
    # the gate / up sums each within the GEMV's error, then silu_and_mul's roundings
    gate_up = gemv_step.gemv2_norm_ref(h, nw, 1e-5, w, b, None)
    want = gemv_step.silu_and_mul_ref(gate_up)
    normed = gemv_step.add_rms_norm_ref(h, None, nw, 1e-5)[0]
    scale = normed.double().abs() @ w.double().abs().t()  # [m, n]
    g, u = gate_up.double().chunk(2, dim=-1)
    sg, su = (2 * ULP[dtype] * (scale + gate_up.double().abs())).chunk(2, dim=-1)
    # d(silu(g) u) = silu'(g) u dg + silu(g) du, |silu'| <= 1.1
    tol = 1.1 * u.abs() * sg + (g.abs() + 1) * su + 2 * ULP[dtype] * want.double().abs() + 1e-6
    assert ((got.double() - want.double()).abs() <= tol).all()
    assert torch.equal(gemv_step.gemv2_norm_pair(h, nw, 1e-5, w, b), got)


def test_gemv2_in_a_cuda_graph() -> None:
    w = (torch.randn(4096, 4096, device=DEV) * 0.02).to(torch.bfloat16)
    nw = torch.ones(4096, device=DEV, dtype=torch.bfloat16)
    h = torch.randn(1, 4096, device=DEV).to(torch.bfloat16)
    gemv_step.run("norm", h, w, None, h, nw, 1e-5)  # loads the module outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv_step.run("norm", h, w, None, h, nw, 1e-5)
    for _ in range(2):
        h.copy_(torch.randn_like(h))
        graph.replay()
        assert torch.equal(y, gemv_step.run("norm", h, w, None, h, nw, 1e-5))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fused_step_generation_close_to_unfused(
    dtype: str, tmp_path: Any, stories_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.gpu.helpers import generate

    path = tiny_model_hd64(tmp_path, stories_path)
    prompts = prompts_of_different_lengths()[:4]
    # max_num_seqs 1: every decode step is batch 1, the fused layer's case
    args = dict(device="cuda", dtype=dtype, block_size=16, max_num_seqs=1, max_model_len=256)
    monkeypatch.setenv("HEADRACE_GEMV", "cublas")
    monkeypatch.setenv("HEADRACE_STEP_FUSION", "0")
    old = generate(path, prompts, max_tokens=24, **args)
    monkeypatch.setenv("HEADRACE_GEMV", "auto")
    monkeypatch.setenv("HEADRACE_STEP_FUSION", "1")
    calls: list[str] = []
    real = gemv_step.run

    def counted(prologue: str, *a: Any, **kw: Any) -> torch.Tensor:
        calls.append(prologue)
        return real(prologue, *a, **kw)

    monkeypatch.setattr(gemv_step, "run", counted)
    new = generate(path, prompts, max_tokens=24, **args)
    # the fused layer ran (eager or at capture); the tiny model's gate/up takes the GEMV too
    assert "norm" in calls and "norm_pair" in calls
    # bf16: these random models move ~1.0 between roundings (test_gpu_step_kernels)
    check_logprobs_close(
        new.out, old.out, "fused-vs-unfused", atol=0.1 if dtype == "float16" else 1.0
    )


@pytest.mark.parametrize("graph", [False, True])
def test_pdl_chain_waits_for_the_previous_kernel(
    graph: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEADRACE_PDL=1: each GEMV reads what the one before it wrote (a missing wait would
    read stale or poisoned values), eagerly and inside a CUDA graph."""
    from cuda import compiler

    assert compiler.pdl_supported(), "this cuda.core's LaunchConfig has no PDL option"
    bf = torch.bfloat16
    ws = [(torch.randn(4096, 4096, device=DEV) * 0.02).to(bf) for _ in range(3)]
    nw = (1 + 0.1 * torch.randn(4096, device=DEV)).to(bf)
    gu_w = (torch.randn(2 * 4096, 4096, device=DEV) * 0.02).to(bf)
    x = torch.randn(1, 4096, device=DEV).to(bf)

    def chain() -> torch.Tensor:
        h = gemv_step.gemv2(x, ws[0])  # o-like
        h = gemv_step.gemv2(h, ws[1], None, x)  # + residual
        gu = gemv_step.gemv2_norm(h, nw, 1e-5, gu_w)  # gate/up
        return gemv_step.gemv2_silu(gu, ws[2], None, h)  # down + residual

    monkeypatch.setenv("HEADRACE_PDL", "0")
    want = chain()
    monkeypatch.setenv("HEADRACE_PDL", "1")
    if not graph:
        for _ in range(5):
            torch.testing.assert_close(chain(), want, rtol=0, atol=0)
        return
    chain()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = chain()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        monkeypatch.setenv("HEADRACE_PDL", "0")
        torch.testing.assert_close(got, chain(), rtol=0, atol=0)
        monkeypatch.setenv("HEADRACE_PDL", "1")
