"""The fused SiLU-and-mul + FP8 quantization kernel (cuda/fp8_fused.cu) against the two
kernels it replaces (silu_and_mul, then quantize_per_token): fresh shapes, NaN-poisoned
outputs, dynamic and static scales; and the FP8 MLP output through the fused path."""

from __future__ import annotations

import random

import pytest
import torch

from cuda import fp8_fused
from cuda.fp8_quant import FP8, quantize_per_token
from cuda.fused_ops import silu_and_mul
from worker.quant.fp8 import Fp8Linear, quantize_weight_per_channel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = torch.device("cuda")


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_matches_silu_mul_then_quant(dtype: torch.dtype, static: bool) -> None:
    rng = random.Random(hash((str(dtype), static)) & 0xFFFF)
    for t, inter in [
        (1, 8),
        (9, 14336),
        (256, 3584),
        (rng.randint(1, 300), 8 * rng.randint(1, 900)),
    ]:
        x = torch.randn(t, 2 * inter, device=DEV, dtype=dtype) * 3
        x[0] = 0  # an all-zero row: the floor scale, zero output
        scale = torch.tensor([0.05], device=DEV) if static else None
        assert fp8_fused.kernel_ok(x)
        hq, hs = fp8_fused.silu_mul_quant(x, scale)
        rq, rs = quantize_per_token(silu_and_mul(x), scale)
        torch.testing.assert_close(hs, rs, rtol=1e-6, atol=0)
        a, b = hq.float(), rq.float()
        assert bool(torch.isfinite(a).all())
        diff = (a - b).abs()
        assert bool((diff <= b.abs() / 8 + 1e-6).all())
        assert float((diff > 0).float().mean()) < 1e-3, (t, inter)


def test_fused_writes_every_element() -> None:
    t, inter = 33, 1032
    x = torch.randn(t, 2 * inter, device=DEV, dtype=torch.bfloat16)
    hq = torch.full((t, inter), 0x7F, dtype=torch.uint8, device=DEV).view(FP8)  # NaN
    hs = torch.full((t, 1), float("nan"), device=DEV)
    fp8_fused.silu_mul_quant(x, out=(hq, hs))
    assert not bool(hq.float().isnan().any())
    assert bool(torch.isfinite(hs).all())


def test_fp8_mlp_down_proj_fused_close_to_unfused() -> None:
    k, n = 4096, 1024
    layer = Fp8Linear(k, n, bias=False).to(DEV)
    wq, ws = quantize_weight_per_channel(torch.randn(n, k, device=DEV) * 0.02)
    layer.weight.data, layer.weight_scale.data = wq, ws
    for t in (1, 8, 64, 300):
        gate_up = torch.randn(t, 2 * k, device=DEV, dtype=torch.bfloat16)
        got = layer.forward_silu_mul(gate_up)
        want = layer(silu_and_mul(gate_up))
        assert got.shape == want.shape == (t, n)
        err = (got.float() - want.float()).abs().max() / want.float().abs().max()
        assert float(err) < 1e-2, (t, float(err))
