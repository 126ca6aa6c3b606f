"""Fused add + RMSNorm, rotary and SiLU-and-mul CUDA kernels against their torch references.

Each case draws fresh random inputs. Outputs come from torch's caching allocator, so blocks
of the same sizes are filled with NaN and freed just before the call: an element the kernel
does not write shows up as NaN. Rotary works in place inside a fused qkv row whose v part
is NaN, which must stay NaN. The references are patched to raise during the kernel call, so
a silent fallback to torch fails the test instead of passing it.

Accuracy: the kernels round where torch rounds, so fp16/bf16 results are bit-identical but
for the RMSNorm sum of squares, whose order differs (a last-bit change of rstd may flip one
rounding); each check allows a tolerance in ulps and requires most elements to be exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from cuda import fused_ops as fo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
NORM_REF, ROTARY_REF, SILU_REF = fo.add_rms_norm_ref, fo.rotary_ref, fo.silu_and_mul_ref
DEV = "cuda"


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("fell back to the torch reference")

    for name in ("add_rms_norm_ref", "rotary_ref", "silu_and_mul_ref"):
        monkeypatch.setattr(fo, name, boom)
    yield


def _poison_allocator(shape: tuple[int, ...], dtype: torch.dtype, count: int = 1) -> None:
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEV) for _ in range(count)]
    del blocks


def _check(
    actual: torch.Tensor,
    expected: torch.Tensor,
    ulps: float,
    *,
    floor: float = 2.0**-14,
    exact_frac: float = 0.99,
) -> None:
    """Within `ulps` ulps of max(|expected|, floor), and at least exact_frac bit-equal."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any(), "unwritten (NaN) elements"
    a, e = actual.double(), expected.double()
    tol = ulps * ULP[expected.dtype] * e.abs().clamp_min(floor)
    bad = (a - e).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} elements off, e.g. {a[bad][:4]} vs {e[bad][:4]}"
    exact = (a == e).double().mean().item()
    assert exact >= exact_frac, f"only {exact:.4f} of the elements are bit-equal"


# --- add + RMSNorm ------------------------------------------------------------------------


def _check_norm(out: torch.Tensor, want: torch.Tensor) -> None:
    if out.dtype == torch.float32:  # rstd an ulp apart moves most fp32 results by an ulp
        _check(out, want, 16, exact_frac=0.0)
    else:  # a flipped rounding of x * rstd moves weight * it by up to 2 ulps
        _check(out, want, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 4096, 5120, 16384, 4097])
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm(
    no_fallback: None, dtype: torch.dtype, hidden: int, num_tokens: int, with_residual: bool
) -> None:
    eps = 1e-5
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=DEV) * 3
    r = torch.randn(num_tokens, hidden, dtype=dtype, device=DEV) if with_residual else None
    w = (torch.rand(hidden, device=DEV) + 0.5).to(dtype)
    assert fo.norm_kernel(x, r, w) is not None
    _poison_allocator((num_tokens, hidden), dtype, count=2)
    out, res = fo.add_rms_norm(x, r, w, eps)
    want_out, want_res = NORM_REF(x, r, w, eps)
    assert torch.equal(res, want_res)
    if r is None:
        assert res is x
    _check_norm(out, want_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 8, 1])  # 16-byte aligned views, then misaligned
def test_add_rms_norm_strided_rows(no_fallback: None, dtype: torch.dtype, offset: int) -> None:
    T, H, eps = 9, 576, 1e-6
    wide = torch.randn(T, H + 24, dtype=dtype, device=DEV)
    x = wide[:, offset : offset + H]
    r = torch.randn(T, 2 * H, dtype=dtype, device=DEV)[:, H:]
    w = torch.randn(H, dtype=dtype, device=DEV)
    name = fo.norm_kernel(x, r, w)
    assert name == ("add_rms_norm_scalar" if offset == 1 else "add_rms_norm_vec")
    _poison_allocator((T, H), dtype, count=2)
    out, res = fo.add_rms_norm(x, r, w, eps)
    want_out, want_res = NORM_REF(x, r, w, eps)
    assert torch.equal(res, want_res)
    _check_norm(out, want_out)


# --- rotary -------------------------------------------------------------------------------


def _cos_sin(head_dim: int, max_pos: int) -> torch.Tensor:
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device=DEV).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, device=DEV, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _qkv(
    num_tokens: int, hq: int, hkv: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused qkv output with NaN v, and q, k as strided views of it."""
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * head_dim, dtype=dtype, device=DEV)
    qkv[:, (hq + hkv) * head_dim :] = float("nan")
    q = qkv[:, : hq * head_dim].view(num_tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(num_tokens, hkv, head_dim)
    return qkv, q, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 96, 256])
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize(("hq", "hkv"), [(32, 8), (4, 4), (6, 1)])
def test_rotary(
    no_fallback: None, dtype: torch.dtype, head_dim: int, num_tokens: int, hq: int, hkv: int
) -> None:
    max_pos = 4096
    cos_sin = _cos_sin(head_dim, max_pos)
    positions = torch.randint(0, max_pos, (num_tokens,), device=DEV)
    qkv, q, k = _qkv(num_tokens, hq, hkv, head_dim, dtype)
    assert fo.rotary_supported(positions, q, k, cos_sin)
    want_q, want_k = q.clone(), k.clone()
    ROTARY_REF(positions, want_q, want_k, cos_sin)
    fo.rotary(positions, q, k, cos_sin)
    # Cancellation in x1*cos - x2*sin: measure ulps against the operands' scale (~1).
    _check(q, want_q, 1, floor=1.0)
    _check(k, want_k, 1, floor=1.0)
    assert qkv[:, (hq + hkv) * head_dim :].isnan().all(), "v was written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_int32_positions_and_out_of_table(no_fallback: None, dtype: torch.dtype) -> None:
    T, hq, hkv, D, max_pos = 6, 4, 2, 128, 64
    cos_sin = _cos_sin(D, max_pos)
    positions = torch.tensor([0, 5, -1, 63, 64, 17], device=DEV)
    _, q, k = _qkv(T, hq, hkv, D, dtype)
    q0, k0 = q.clone(), k.clone()
    fo.rotary(positions.int(), q, k, cos_sin)
    inside = torch.tensor([True, True, False, True, False, True], device=DEV)
    want_q, want_k = q0[inside].clone(), k0[inside].clone()
    ROTARY_REF(positions[inside], want_q, want_k, cos_sin)
    _check(q[inside], want_q, 1, floor=1.0)
    _check(k[inside], want_k, 1, floor=1.0)
    # Out-of-table positions (CUDA-graph padding) leave their tokens as they were.
    assert torch.equal(q[~inside], q0[~inside]) and torch.equal(k[~inside], k0[~inside])


# --- SiLU and mul -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 576, 4096, 14336, 13])
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("strided", [False, True])
def test_silu_and_mul(
    no_fallback: None, dtype: torch.dtype, inter: int, num_tokens: int, strided: bool
) -> None:
    pad = 16 if strided else 0
    wide = torch.randn(num_tokens, 2 * inter + pad, dtype=dtype, device=DEV) * 4
    x = wide[:, : 2 * inter]
    assert fo.silu_kernel(x) is not None
    _poison_allocator((num_tokens, inter), dtype)
    out = fo.silu_and_mul(x)
    if dtype == torch.float32:  # in case torch's expf differs from NVRTC's in the last bit
        _check(out, SILU_REF(x), 2, exact_frac=0.9)
    else:
        _check(out, SILU_REF(x), 1)


# --- CUDA graphs --------------------------------------------------------------------------


def test_cuda_graph_replay_matches_eager(no_fallback: None) -> None:
    dtype, T, H, hq, hkv, D, inter, eps = torch.bfloat16, 3, 4096, 32, 8, 128, 1024, 1e-5
    max_pos = 2048
    cos_sin = _cos_sin(D, max_pos)
    x = torch.empty(T, H, dtype=dtype, device=DEV)
    residual = torch.empty_like(x)
    w = (torch.rand(H, device=DEV) + 0.5).to(dtype)
    positions = torch.zeros(T, dtype=torch.int64, device=DEV)
    qkv, q, k = _qkv(T, hq, hkv, D, dtype)
    mlp_in = torch.empty(T, 2 * inter, dtype=dtype, device=DEV)

    def fill() -> None:
        x.copy_(torch.randn_like(x))
        residual.copy_(torch.randn_like(residual))
        positions.copy_(torch.randint(0, max_pos, (T,), device=DEV))
        qkv.copy_(torch.randn_like(qkv))
        mlp_in.copy_(torch.randn_like(mlp_in) * 4)

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normed, res = fo.add_rms_norm(x, residual, w, eps)
        fo.rotary(positions, q, k, cos_sin)
        return normed, res, fo.silu_and_mul(mlp_in)

    fill()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and load modules outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_normed, g_res, g_act = step()

    for _ in range(3):
        fill()
        eager_qkv = qkv.clone()
        eager_q = eager_qkv[:, : hq * D].view(T, hq, D)
        eager_k = eager_qkv[:, hq * D : (hq + hkv) * D].view(T, hkv, D)
        e_normed, e_res = fo.add_rms_norm(x.clone(), residual.clone(), w, eps)
        fo.rotary(positions.clone(), eager_q, eager_k, cos_sin)
        e_act = fo.silu_and_mul(mlp_in.clone())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(g_normed, e_normed)
        assert torch.equal(g_res, e_res)
        assert torch.equal(g_act, e_act)
        assert torch.equal(q, eager_q) and torch.equal(k, eager_k)
        _check_norm(g_normed, NORM_REF(x, residual, w, eps)[0])
