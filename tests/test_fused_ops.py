"""Fused ops on CPU: references against independent formulations, dispatch, kernel plans,
launch arguments against the kernel signatures (tests/test_kernels_compile.py compiles them)."""

from __future__ import annotations

import pytest
import torch

from cuda import fused_ops as fo
from tests.kernel_signatures import launch_types

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _assert_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float) -> None:
    """|actual - expected| within `ulps` units in the last place of expected's dtype.

    fp32 references round intermediate results in fp32 too, so against a float64 formula
    they carry a few fp32 ulps of the operands (cancellation): a plain fp32 tolerance.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        return
    a, e = actual.double(), expected.double()
    assert not a.isnan().any()
    tol = ulps * ULP[expected.dtype] * e.abs().clamp_min(2.0**-14)
    bad = (a - e).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} elements off, e.g. {a[bad][:4]} vs {e[bad][:4]}"


# --- references --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_ref_matches_formula(dtype: torch.dtype, with_residual: bool) -> None:
    T, H, eps = 5, 96, 1e-5
    x = torch.randn(T, H, dtype=dtype)
    r = torch.randn(T, H, dtype=dtype) if with_residual else None
    w = (torch.rand(H) + 0.5).to(dtype)
    out, res = fo.add_rms_norm_ref(x, r, w, eps)
    # The same rounding points in float64: round the sum, round the normed value, round
    # the weighted product.
    h = (x.double() + r.double()).to(dtype) if r is not None else x
    hd = h.double()
    normed = (hd / torch.sqrt((hd * hd).sum(-1, keepdim=True) / H + eps)).to(dtype)
    expected = (w.double() * normed.double()).to(dtype)
    assert torch.equal(res, h)
    if r is None:
        assert res is x
    _assert_ulps(out, expected, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_ref_matches_rotation(dtype: torch.dtype) -> None:
    T, Hq, Hkv, D, P = 6, 4, 2, 16, 50
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.outer(torch.arange(P, dtype=torch.float64), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).float()
    positions = torch.tensor([0, 3, 49, 7, 7, 12])
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, dtype=dtype)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    q0, k0, v0 = q.clone(), k.clone(), qkv[:, (Hq + Hkv) * D :].clone()
    fo.rotary_ref(positions, q, k, cos_sin)
    # Pair (i, i + D/2) of each head is a complex number turned by pos * inv_freq[i].
    for before, after in ((q0, q), (k0, k)):
        z = torch.complex(before[..., : D // 2].double(), before[..., D // 2 :].double())
        cs = cos_sin.double()[positions]
        turn = torch.complex(cs[:, : D // 2], cs[:, D // 2 :])[:, None, :]
        zr = z * turn
        expected = torch.cat([zr.real, zr.imag], -1).to(dtype)
        _assert_ulps(after, expected, 1)
        assert torch.equal(after[0], before[0])  # position 0 turns by nothing
    assert torch.equal(qkv[:, (Hq + Hkv) * D :], v0)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_ref_matches_formula(dtype: torch.dtype) -> None:
    x = torch.randn(7, 2 * 40, dtype=dtype) * 4
    gate, up = x[:, :40].double(), x[:, 40:].double()
    silu = (gate / (1 + torch.exp(-gate))).to(dtype)  # silu rounded to dtype
    expected = (silu.double() * up).to(dtype)  # then one rounded product
    _assert_ulps(fo.silu_and_mul_ref(x), expected, 1)


# --- dispatch on CPU -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_dispatch_is_reference(dtype: torch.dtype) -> None:
    x, r = torch.randn(3, 64, dtype=dtype), torch.randn(3, 64, dtype=dtype)
    w = torch.rand(64, dtype=dtype)
    for res in (r, None):
        got, want = fo.add_rms_norm(x, res, w, 1e-6), fo.add_rms_norm_ref(x, res, w, 1e-6)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert fo.add_rms_norm(x, None, w, 1e-6)[1] is x

    cos_sin = torch.rand(10, 8)
    positions = torch.tensor([1, 9, 4])
    q, k = torch.randn(3, 2, 8, dtype=dtype), torch.randn(3, 1, 8, dtype=dtype)
    q2, k2 = q.clone(), k.clone()
    fo.rotary(positions, q, k, cos_sin)
    fo.rotary_ref(positions, q2, k2, cos_sin)
    assert torch.equal(q, q2) and torch.equal(k, k2)

    g = torch.randn(3, 16, dtype=dtype)
    assert torch.equal(fo.silu_and_mul(g), fo.silu_and_mul_ref(g))


# --- which kernel takes which tensors ------------------------------------------------------


def test_norm_kernel_plan() -> None:
    bf = torch.bfloat16
    x, w = torch.randn(4, 64, dtype=bf), torch.randn(64, dtype=bf)
    assert fo.norm_kernel(x, x.clone(), w) == "add_rms_norm_vec"
    assert fo.norm_kernel(x, None, w) == "add_rms_norm_vec"
    wide = torch.randn(4, 80, dtype=bf)
    assert fo.norm_kernel(wide[:, 8:72], None, w) == "add_rms_norm_vec"  # 16-byte offsets
    assert fo.norm_kernel(wide[:, 1:65], None, w) == "add_rms_norm_scalar"  # misaligned
    odd = torch.randn(4, 65, dtype=bf)
    assert fo.norm_kernel(odd, None, torch.randn(65, dtype=bf)) == "add_rms_norm_scalar"
    assert fo.norm_kernel(x.double(), None, w.double()) is None
    assert fo.norm_kernel(x, None, w.float()) is None  # torch would promote to fp32
    assert fo.norm_kernel(x.t().contiguous().t(), None, w) is None  # stride(1) != 1
    assert fo.norm_kernel(x, x.half(), w) is None


def test_silu_kernel_plan() -> None:
    x = torch.randn(3, 2 * 64, dtype=torch.float16)
    assert fo.silu_kernel(x) == "silu_and_mul_vec"
    assert fo.silu_kernel(torch.randn(3, 2 * 63, dtype=torch.float16)) == "silu_and_mul_scalar"
    wide = torch.randn(3, 200, dtype=torch.float16)
    assert fo.silu_kernel(wide[:, 1:129]) == "silu_and_mul_scalar"
    assert fo.silu_kernel(torch.randn(3, 7)) is None
    assert fo.silu_kernel(torch.randn(2, 3, 8)) is None


def test_rotary_plan() -> None:
    T, Hq, Hkv, D = 3, 4, 2, 64
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, dtype=torch.bfloat16)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    pos, cs = torch.arange(T), torch.rand(16, D)
    assert fo.rotary_supported(pos, q, k, cs)
    assert fo.rotary_supported(pos.int(), q, k, cs)
    assert not fo.rotary_supported(pos.float(), q, k, cs)
    assert not fo.rotary_supported(pos, q, k, torch.rand(16, D + 2))
    assert not fo.rotary_supported(pos, q, k, cs.double())
    assert not fo.rotary_supported(pos, q, k.half(), cs)
    assert not fo.rotary_supported(pos[:2], q, k, cs)
    odd = torch.randn(T, 2, 7)
    assert not fo.rotary_supported(pos, odd, odd, torch.rand(16, 7))


# --- launch arguments against the kernel signatures ----------------------------------------


def test_launch_args_match_signatures() -> None:
    sigs = launch_types(fo.source())
    assert sorted(sigs) == sorted(fo.KERNELS)
    x, w = torch.randn(3, 64), torch.randn(64)
    out = torch.empty_like(x)
    launches = [
        fo.norm_launch(n, x, r, w, 1e-5, out, ro)
        for n in ("add_rms_norm_vec", "add_rms_norm_scalar")
        for r, ro in ((x, out), (None, None))
    ]
    qkv = torch.randn(3, 8 * 16)
    q, k = qkv[:, :64].view(3, 4, 16), qkv[:, 64:96].view(3, 2, 16)
    launches.append(fo.rotary_launch(torch.arange(3), q, k, torch.rand(9, 16)))
    for n in ("silu_and_mul_vec", "silu_and_mul_scalar"):
        launches.append(fo.silu_launch(n, x, torch.empty(3, 32)))
    for name, grid, block, args in launches:
        assert [type(a) for a in args] == sigs[name], name
        assert block % 32 == 0 and 32 <= block <= 1024
        assert all(g > 0 for g in grid)
    name, grid, block, args = fo.rotary_launch(torch.arange(3), q, k, torch.rand(9, 16))
    assert grid == (3, 1) and block == 32  # 6 heads x 2 groups of 4 pairs, warp-rounded
    assert args[8] == 2  # Hkv
    assert args[2] == 128 and args[3] == 16 and args[-2] == 9 and args[-1] == 8  # strides
    assert fo.norm_launch("add_rms_norm_vec", x, None, w, 1e-5, out, None)[3][-2] == 16
    assert fo.silu_launch("silu_and_mul_scalar", x, out)[1] == (3, 1)


def test_rotary_vector_width_and_geometry() -> None:
    T, Hq, Hkv, D = 5, 32, 8, 128
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, dtype=torch.bfloat16)
    q, k = qkv[:, : Hq * D].view(T, Hq, D), qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    cs = torch.rand(64, D)
    assert fo.rotary_pairs_per_thread(64, q, k, cs) == 8  # 16-byte accesses
    assert fo.rotary_pairs_per_thread(32, q, k, cs[:, :64]) == 8  # partial rotary
    assert fo.rotary_pairs_per_thread(6, q, k, cs[:, :12]) == 2  # half not a multiple of 8
    assert fo.rotary_pairs_per_thread(64, q, k, cs[:, 1:]) == 1  # table misaligned
    shifted = torch.randn(T * qkv.shape[1] + 1, dtype=torch.bfloat16)[1:].view(T, -1)
    sq = shifted[:, : Hq * D].view(T, Hq, D)  # one element past 16-byte alignment
    sk = shifted[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    assert fo.rotary_pairs_per_thread(64, sq, sk, cs) == 1
    assert fo.rotary_pairs_per_thread(64, q.float(), k.float(), cs) == 4
    # Llama-3-8B: decode spreads one head a thread over two blocks a token; at 880 tokens a
    # thread takes 4 heads (12 slots x 8 groups of 8 pairs = 3 warps, one block a token).
    assert fo.rotary_geometry(1, 40, 64, 8) == ((1, 2), 160)
    assert fo.rotary_geometry(880, 40, 64, 8) == ((880, 1), 96)
    assert fo.rotary_geometry(16384, 72, 64, 8) == ((16384, 1), 160)
    for t, h, half, vp in [(3, 7, 6, 2), (1, 3, 1024, 1), (9, 3, 33, 1), (4099, 40, 64, 1)]:
        (gt, gy), block = fo.rotary_geometry(t, h, half, vp)
        assert gt == t and 1 <= gy <= h and block <= fo.ROTARY_BLOCK
        assert block >= min(-(-half // vp), fo.ROTARY_BLOCK)  # a head's pair groups
