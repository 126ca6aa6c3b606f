"""LayerNorm, GELU and partial rotary on CPU: references against transformers' formulas,
kernel plans, launch arguments against the kernel signatures (tests/test_kernels_compile.py
compiles them)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from cuda import fused_ops as fo
from cuda import layer_ops as lo
from tests.kernel_signatures import launch_types

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_layer_norm_ref_matches_float64_formula() -> None:
    x = torch.randn(5, 96) * 3 + 1
    w, b = torch.rand(96) + 0.5, torch.randn(96)
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    expected = (xd - mean) / torch.sqrt(var + 1e-5) * w.double() + b.double()
    actual = lo.layer_norm_ref(x, w, b, 1e-5).double()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_ref_matches_formula(approximate: str) -> None:
    x = torch.linspace(-6, 6, 200, dtype=torch.float64)[None]
    if approximate == "none":
        expected = 0.5 * x * (1 + torch.erf(x / 2**0.5))
    else:
        expected = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    actual = lo.gelu_ref(x.float(), approximate).double()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_partial_rotary_matches_transformers() -> None:
    # GPT-NeoX rotary_pct 0.25: the first R = D/4 dims rotate, the rest pass through.
    T, H, D, R = 6, 3, 32, 8
    positions = torch.tensor([0, 5, 1, 9, 2, 7])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))
    freqs = torch.outer(torch.arange(16).float(), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [P, R]
    q, k = torch.randn(T, H, D), torch.randn(T, H, D)
    emb = torch.cat([freqs, freqs], dim=-1)[positions]  # HF's [T, R] cos/sin layout
    hq, hk = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None]
    )
    fo.rotary_ref(positions, q, k, cos_sin)
    torch.testing.assert_close(q, hq[0].transpose(0, 1))
    torch.testing.assert_close(k, hk[0].transpose(0, 1))


def test_partial_rotary_plan_and_launch() -> None:
    qkv = torch.randn(3, 3 * 4 * 32)
    q, k = qkv[:, :128].view(3, 4, 32), qkv[:, 128:256].view(3, 4, 32)
    assert fo.rotary_supported(torch.arange(3), q, k, torch.rand(9, 8))
    assert not fo.rotary_supported(torch.arange(3), q, k, torch.rand(9, 7))
    assert not fo.rotary_supported(torch.arange(3), q, k, torch.rand(9, 34))
    _, grid, block, args = fo.rotary_launch(torch.arange(3), q, k, torch.rand(9, 8))
    assert grid == (3, 1) and block == 32 and args[-1] == 4  # half of the rotary dims


def test_plans() -> None:
    x, w, b = torch.randn(4, 64), torch.randn(64), torch.randn(64)
    assert lo.layer_norm_supported(x, w, b)
    assert lo.layer_norm_supported(torch.randn(4, 128)[:, :64], w, b)  # strided rows
    assert not lo.layer_norm_supported(x, w, b.half())
    assert not lo.layer_norm_supported(x, w[:32], b)
    assert not lo.layer_norm_supported(x.t(), w[:4], b[:4])
    assert lo.gelu_supported(x, "none") and lo.gelu_supported(x, "tanh")
    assert not lo.gelu_supported(x, "sigmoid") and not lo.gelu_supported(x.double(), "none")
    # CPU tensors always take the reference
    torch.testing.assert_close(lo.layer_norm(x, w, b, 1e-5), lo.layer_norm_ref(x, w, b, 1e-5))
    torch.testing.assert_close(lo.gelu(x, "tanh"), lo.gelu_ref(x, "tanh"))


def test_launch_args_match_signatures() -> None:
    sigs = launch_types(lo.source())
    assert sorted(sigs) == sorted(lo.KERNELS)
    x = torch.randn(3, 2048)[:, :1500]
    w, b = torch.randn(1500), torch.randn(1500)
    out = torch.empty(3, 1500)
    launches = [lo.layer_norm_launch(x, w, b, 1e-5, out)]
    launches += [lo.gelu_launch(x, a, out) for a in ("none", "tanh")]
    for name, _grid, block, args in launches:
        assert [type(a) for a in args] == sigs[name], name
        assert block % 32 == 0 and 32 <= block <= 1024
    assert launches[0][1:3] == ((3,), 1024) and launches[0][3][1] == 2048
    assert launches[1][0] == "gelu_erf" and launches[2][0] == "gelu_tanh"
    assert launches[1][1] == (3, 6)  # ceil(1500 / 256)
