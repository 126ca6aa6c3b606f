"""The fused SiLU-and-mul + FP8 quantization path on the CPU: its reference equals the two
steps it replaces, the FP8 down_proj hook gives the same output as the unfused layers, and
the kernel compiles for sm_90 without spills."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cuda import compiler, fp8_fused
from cuda.fp8_quant import quantize_per_token_ref
from cuda.fused_ops import silu_and_mul_ref
from worker.quant.fp8 import Fp8Linear, quantize_weight_per_channel


def test_reference_is_silu_mul_then_quant() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    hq, hs = fp8_fused.silu_mul_quant(x)  # CPU: the reference
    rq, rs = quantize_per_token_ref(silu_and_mul_ref(x))
    assert hq.dtype == torch.float8_e4m3fn and hs.shape == (5, 1)
    assert torch.equal(hq.float(), rq.float()) and torch.equal(hs, rs)
    static = torch.tensor([0.02])
    _, ss = fp8_fused.silu_mul_quant(x, static)
    assert bool((ss == 0.02).all())
    assert not fp8_fused.kernel_ok(x)  # CPU tensors never take the kernel


def test_fp8_down_proj_hook_matches_unfused() -> None:
    g = torch.Generator().manual_seed(1)
    k, n = 32, 48
    layer = Fp8Linear(k, n, bias=True)
    wq, ws = quantize_weight_per_channel(torch.randn(n, k, generator=g))
    layer.weight.data, layer.weight_scale.data = wq, ws
    layer.bias.data = torch.randn(n, generator=g)  # type: ignore[union-attr]
    gate_up = torch.randn(7, 2 * k, generator=g)
    want = layer(silu_and_mul_ref(gate_up))
    torch.testing.assert_close(layer.forward_silu_mul(gate_up), want, rtol=0, atol=0)


def test_gated_mlp_calls_the_fp8_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.models.layers import GatedMLP

    class Cfg:
        hidden_size, intermediate_size, mlp_bias = 16, 32, False

    mlp = GatedMLP(Cfg())  # type: ignore[arg-type]
    down = Fp8Linear(32, 16, bias=False)
    wq, ws = quantize_weight_per_channel(torch.randn(16, 32))
    down.weight.data, down.weight_scale.data = wq, ws
    mlp.down_proj = down  # type: ignore[assignment]
    calls: list[tuple[int, ...]] = []
    real = Fp8Linear.forward_silu_mul

    def spy(self: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(self, x)

    monkeypatch.setattr(Fp8Linear, "forward_silu_mul", spy)
    x = torch.randn(3, 16)
    y = mlp(x)
    assert calls == [(3, 64)] and y.shape == (3, 16)


@pytest.mark.parametrize("bf16", [1, 0])
def test_fused_kernel_compiles(bf16: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiler, "CACHE_DIR", tmp_path)
    cubin, log = compiler.compile_cubin(
        compiler.read_source(fp8_fused.SOURCE_PATH),
        arch="sm_90",
        defines={"HR_BF16": bf16},
        name="fp8_fused",
        verbose_ptxas=True,
    )
    names = ["silu_mul_quant_fp8", "silu_mul_quant_fp8_staged"]
    names += [f"silu_mul_quant_fp8_v{v}" for v in fp8_fused.MAX_THREADS]
    for name in names:
        assert f"Compiling entry function '{name}'" in log and name.encode() in cubin
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", log)]
    assert len(spills) == len(names) and not any(spills), log
    stack = [int(s) for s in re.findall(r"(\d+) bytes stack frame", log)]
    assert not any(stack), log
    # each kernel's registers fit the largest block the plan launches it with
    for name, regs in re.findall(
        r"Function properties for (\w+).*?Used (\d+) registers", log, re.S
    ):
        if name.startswith("silu_mul_quant_fp8_v"):
            assert int(regs) * fp8_fused.MAX_THREADS[int(name[-1])] <= 65536, (name, regs)
        if name == "silu_mul_quant_fp8_staged":  # four row-blocks an SM (its launch bounds)
            assert int(regs) * fp8_fused.STAGED_THREADS * 4 <= 65536, (name, regs)


@pytest.mark.parametrize(
    ("inter", "want"),
    [(8, "regs"), (4088, "regs"), (4096, "staged"), (14336, "staged"), (28672, "staged")]
    + [(57344, "staged"), (57352, "two-pass"), (262144, "two-pass")],
)
def test_path_by_row_size(inter: int, want: str) -> None:
    assert fp8_fused.path(inter // 8) == want


@pytest.mark.parametrize("inter", [8, 16, 24, 64, 1000, 4096, 8192, 11008, 14336, 18944, 28672])
def test_register_path_plan_covers_the_row(inter: int) -> None:
    units = inter // 8
    plan = fp8_fused.plan(units)
    assert plan is not None, inter  # every model size listed takes the register path
    vpt, g, r = plan
    assert 1 <= vpt <= fp8_fused.MAX_VPT and g * vpt >= units and g * (vpt - 1) < units
    assert g * r <= fp8_fused.MAX_THREADS[vpt]
    assert g % 32 == 0 or 32 % g == 0  # groups tile a warp or are whole warps
    assert r == 1 or g <= 256


def test_register_path_plan_gives_up_past_its_kernels() -> None:
    assert fp8_fused.plan(8 * 512) is not None and fp8_fused.plan(8 * 512 + 1) is None
