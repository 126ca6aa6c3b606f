"""The fused SiLU-and-mul + FP8 quantization kernel (cuda/fp8_fused.cu) against the two
kernels it replaces (silu_and_mul, then cuda/fp8_quant.py's kernel), bit for bit (not the
torch quantization: its fp8 conversion differs from the device's in ~0.1% of elements):
every row size the staged and register paths take (the model sizes, small and odd ones;
each size through both paths where both can take it), 1, 3 and 880 rows, signed zeros and
tiny values (the staged path's reciprocal division), the amax in a row's last element, all-zero rows (the floor scale), a static
scale, strided gate_up views, NaN-poisoned outputs, both dtypes; the two-pass fallback the
same; and the FP8 MLP output through the fused path."""

from __future__ import annotations

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
INTERS = [8, 24, 1000, 8192, 11008, 14336, 18944, 28672]


def _gate_up(t: int, inter: int, dtype: torch.dtype, seed: int, pad: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    base = torch.randn(t, 2 * inter + pad, device=DEV, dtype=torch.float32, generator=g) * 3
    x = base.to(dtype)[:, : 2 * inter]  # pad > 0: a strided view, x_stride > 2 I
    if t > 1:
        x[1] = 0  # an all-zero row: the floor scale, zero output
    if t > 2:
        x[2, inter - 1], x[2, 2 * inter - 1] = 6.0, 80.0  # the amax in the last element
    k = min(4, inter // 2)
    tiny = torch.tensor([1e-30, -1e-20, 3e-9, -2e-6], dtype=dtype, device=DEV)
    x[0, :k] = tiny[:k]  # tiny gates: h below and around e4m3's subnormals
    x[0, inter + k : inter + 2 * k] = -0.0  # h = +-0: the quantized zero keeps its sign
    return x


def _poisoned(t: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    hq = torch.full((t, inter), 0x7F, dtype=torch.uint8, device=DEV).view(FP8)  # NaN
    return hq, torch.full((t, 1), float("nan"), device=DEV)


def _check(x: torch.Tensor, scale: torch.Tensor | None) -> None:
    t, inter = x.shape[0], x.shape[1] // 2
    assert fp8_fused.kernel_ok(x)
    hq, hs = fp8_fused.silu_mul_quant(x, scale, out=_poisoned(t, inter))
    rq, rs = quantize_per_token(silu_and_mul(x), scale)
    assert torch.equal(hs, rs), (t, inter)
    assert torch.equal(hq.view(torch.uint8), rq.view(torch.uint8)), (t, inter)


@pytest.mark.parametrize("kind", ["default", "regs"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("inter", INTERS)
def test_fused_equals_silu_mul_then_quant(
    inter: int, dtype: torch.dtype, static: bool, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "regs":  # the register path where the staged one would run
        monkeypatch.setattr(fp8_fused, "STAGED_MIN_UNITS", 1 << 30)
    want = "staged" if kind == "default" and inter >= 4096 else "regs"
    assert fp8_fused.path(inter // 8) == want
    scale = torch.tensor([0.05], device=DEV) if static else None
    for t in (1, 3, 880):
        _check(_gate_up(t, inter, dtype, seed=t * 7 + inter), scale)
    _check(_gate_up(37, inter, dtype, seed=inter, pad=24), scale)  # strided rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_random_shapes(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    for _ in range(12):
        t = int(torch.randint(1, 400, (1,), generator=g))
        inter = 8 * int(torch.randint(1, 4096, (1,), generator=g))
        _check(_gate_up(t, inter, dtype, seed=t + inter), None)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_two_pass_fallback_equals_the_register_path(
    static: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    scale = torch.tensor([0.03], device=DEV) if static else None
    for inter in (8, 1000, 14336):
        x = _gate_up(65, inter, torch.bfloat16, seed=inter)
        want = fp8_fused.silu_mul_quant(x, scale)
        with monkeypatch.context() as m:
            m.setattr(fp8_fused, "plan", lambda units: None)
            got = fp8_fused.silu_mul_quant(x, scale, out=_poisoned(65, inter))
        assert torch.equal(got[1], want[1])
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    # past the staged path (I > 57344): the fallback, against the reference
    assert fp8_fused.path(57352 // 8) == "two-pass"
    _check(_gate_up(5, 57352, torch.bfloat16, seed=1), scale)
    # the staged path's largest rows
    assert fp8_fused.path(57344 // 8) == "staged"
    _check(_gate_up(67, 57344, torch.bfloat16, seed=2), scale)


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
