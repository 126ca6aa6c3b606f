"""The add + RMSNorm + FP8 quantization fusion (cuda/norm_quant.py, HEADRACE_FP8_NORM_QUANT)
on the CPU: its reference is add_rms_norm_ref then quantize_per_token_ref; the norm hands a
pre-quantized input to an Fp8Linear only under the switch and only where the layer would
quantize per token for _scaled_mm (more rows than the GEMV takes); a model's logits are the
same with the fusion as without. The kernel's compile check is in test_kernels_compile.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cuda import fp8_gemv, norm_quant
from cuda.fp8_quant import quantize_per_token_ref
from cuda.fused_ops import add_rms_norm_ref
from tests.fp8_checkpoints import model_logits
from tests.tiny_models import make_tiny_model
from worker.models.dense import DenseLinear
from worker.models.layers import RMSNorm
from worker.quant import fp8
from worker.quant.fp8 import Fp8Input, Fp8Linear, quantize_weight_per_channel

H = 64


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == fp8.FP8 else t


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["x", "x+res"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reference_is_norm_then_quant(
    dtype: torch.dtype, with_residual: bool, static: bool
) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(9, H, generator=g) * 4).to(dtype)
    x[2] = 0  # all zero (without the residual): the floor scale
    res = (torch.randn(9, H, generator=g)).to(dtype) if with_residual else None
    w = (torch.rand(H, generator=g) + 0.5).to(dtype)
    scale = torch.tensor([0.01]) if static else None
    got = norm_quant.add_rms_norm_quant(x, res, w, 1e-5, scale)  # CPU: the unfused ops
    ref = norm_quant.add_rms_norm_quant_ref(x, res, w, 1e-5, scale)
    out, new_res = add_rms_norm_ref(x, res, w, 1e-5)
    xq, xs = quantize_per_token_ref(out, scale)
    for a, b, c in zip(got, ref, (out, new_res, xq, xs), strict=True):
        assert torch.equal(_bits(a), _bits(b)) and torch.equal(_bits(b), _bits(c))
    assert xs.shape == (9, 1) and xq.dtype == fp8.FP8
    if static:
        assert bool((xs == 0.01).all())
    assert not norm_quant.kernel_ok(x, res, w)  # CPU tensors never take the kernel


def _fp8_linear(k: int, n: int, static: bool = False, seed: int = 0) -> Fp8Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Fp8Linear(k, n, bias=True, static_input=static)
    wq, ws = quantize_weight_per_channel(torch.randn(n, k, generator=g) * 0.1)
    layer.weight.data, layer.weight_scale.data = wq, ws
    layer.bias.data = torch.randn(n, generator=g).to(torch.bfloat16)  # type: ignore[union-attr]
    if layer.input_scale is not None:
        layer.input_scale.data.fill_(0.02)
    return layer


@pytest.fixture
def gpu_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FP8 layer's path rule as on an H200, on CPU tensors: the row-wise GEMM mode,
    the GEMV for 1..MAX_ROWS rows (HEADRACE_FP8_GEMV's kernel), the device test skipped."""
    monkeypatch.setattr(fp8, "gemm_mode", lambda device: "rowwise")
    rows = fp8_gemv.MAX_ROWS[fp8_gemv.MODE]
    monkeypatch.setattr(fp8, "uses_gemv", lambda x, w: 1 <= x.shape[0] <= rows)

    def takes(self: Fp8Linear, x: torch.Tensor) -> bool:  # takes_fp8_input less x.is_cuda
        return x.dtype in (torch.bfloat16, torch.float16) and fp8.quantizes_per_token(
            x, self.weight
        )

    monkeypatch.setattr(Fp8Linear, "takes_fp8_input", takes)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_norm_hands_over_its_quantization_only_past_the_gemv(
    static: bool, gpu_rule: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(norm_quant, "ENABLED", True)
    norm = RMSNorm(H, 1e-5).to(torch.bfloat16)
    norm.weight.data = torch.rand(H).to(torch.bfloat16) + 0.5
    layer = _fp8_linear(H, 48, static)
    for t in (1, 8, 9, 40):
        x = torch.randn(t, H).to(torch.bfloat16)
        res = torch.randn(t, H).to(torch.bfloat16)
        h, new_res, pre = norm.forward_for(x, res, layer)
        want_h, want_res = norm(x, res)
        assert torch.equal(h, want_h) and torch.equal(new_res, want_res)
        if t <= fp8_gemv.MAX_ROWS[fp8_gemv.MODE]:
            assert pre is None, t  # the GEMV reads the 16-bit rows
            continue
        assert isinstance(pre, Fp8Input), t
        xq, xs = quantize_per_token_ref(want_h, layer.input_scale)
        assert torch.equal(pre.xq.view(torch.uint8), xq.view(torch.uint8))
        assert torch.equal(pre.scales, xs)
        assert torch.equal(layer(h, pre), layer(h))  # the layer's output is unchanged


def test_no_handover_without_the_switch_or_an_fp8_consumer(
    gpu_rule: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    norm = RMSNorm(H, 1e-5).to(torch.bfloat16)
    x = torch.randn(40, H).to(torch.bfloat16)
    fp8_layer = _fp8_linear(H, 48)
    monkeypatch.setattr(norm_quant, "ENABLED", False)
    assert norm.forward_for(x, None, fp8_layer)[2] is None
    monkeypatch.setattr(norm_quant, "ENABLED", True)
    assert norm.forward_for(x, None, fp8_layer)[2] is not None
    assert norm.forward_for(x, None, DenseLinear(H, 48))[2] is None
    assert norm.forward_for(x, None, None)[2] is None  # Mixtral: no gate_up_proj
    assert norm.forward_for(x.float(), None, fp8_layer)[2] is None  # fp32 rows
    view = x[:, : H - 16]  # a strided view (the rule reads x's layout for the output's)
    assert RMSNorm(H - 16, 1e-5).forward_for(view, None, _fp8_linear(H - 16, 48))[2] is None
    monkeypatch.setattr(fp8, "gemm_mode", lambda device: "tensorwise")
    assert norm.forward_for(x, None, fp8_layer)[2] is None
    monkeypatch.setattr(fp8, "gemm_mode", lambda device: "rowwise")
    assert norm.forward_for(x, None, _fp8_linear(H, 40))[2] is None  # N % 16: dequantized


def test_takes_fp8_input_is_false_on_cpu() -> None:
    assert not _fp8_linear(H, 48).takes_fp8_input(torch.randn(40, H).to(torch.bfloat16))


def test_llama_logits_equal_with_the_fusion(
    tmp_path: Path, stories_path: Path, gpu_rule: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny FP8 Llama (prefill of 20 rows, then decode steps of 1): the same logits with
    and without the switch, and with it each layer's q/k/v and gate/up got a pre-quantized
    input exactly on the steps past the GEMV's rows."""
    path = make_tiny_model("llama", tmp_path / "llama", stories_path, initializer_range=0.1)
    tokens = torch.randint(3, 512, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    kw = dict(quantization="fp8", dtype="bfloat16")
    calls: list[tuple[int, bool]] = []
    real = Fp8Linear.forward

    def spy(self: Fp8Linear, x: torch.Tensor, x_fp8: Fp8Input | None = None) -> torch.Tensor:
        calls.append((x.shape[0], x_fp8 is not None))
        return real(self, x, x_fp8)

    monkeypatch.setattr(Fp8Linear, "forward", spy)
    monkeypatch.setattr(norm_quant, "ENABLED", False)  # HEADRACE_FP8_NORM_QUANT=0
    want = model_logits(path, tokens, **kw)
    assert calls and not any(pre for _, pre in calls)
    calls.clear()
    monkeypatch.setattr(norm_quant, "ENABLED", True)
    got = model_logits(path, tokens, **kw)
    assert torch.equal(got, want)
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    prefill = [pre for t, pre in calls if t == len(tokens) // 2]
    assert prefill == [True, False] * (2 * layers)  # q/k/v, o, gate/up, down of each layer
    assert not any(pre for t, pre in calls if t == 1)  # decode rows: the GEMV


@pytest.mark.parametrize(
    ("fmt", "strategy", "activation"),
    [("compressed-tensors", "channel", "static"), ("fp8", "tensor", "dynamic")],
)
def test_tensor_parallel_ranks_equal_with_the_fusion(
    tmp_path: Path,
    fmt: str,
    strategy: str,
    activation: str,
    gpu_rule: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two ranks (threads): q/k/v and gate/up are column-parallel with the whole hidden row
    as input, so each rank's norm quantizes the same rows for its shard; the greedy tokens
    equal the unfused ranks' exactly."""
    from tests.conftest import STORIES
    from tests.fp8_checkpoints import random_llama, write_fp8
    from tests.test_tensor_parallel import config_of, greedy, run_ranks
    from worker.parallel.engine import TpEngineCore

    base = random_llama(tmp_path / "base", STORIES)
    path, _ = write_fp8(base, tmp_path, fmt, strategy, activation, kv_scale=0.5)
    config = config_of(path, dtype="bfloat16")
    handed: list[bool] = []
    real = Fp8Linear.forward

    def spy(self: Fp8Linear, x: torch.Tensor, x_fp8: Fp8Input | None = None) -> torch.Tensor:
        handed.append(x_fp8 is not None)
        return real(self, x, x_fp8)

    monkeypatch.setattr(Fp8Linear, "forward", spy)
    monkeypatch.setattr(norm_quant, "ENABLED", False)  # HEADRACE_FP8_NORM_QUANT=0
    off = run_ranks(2, lambda g: greedy(TpEngineCore(config, g)))
    assert handed and not any(handed)
    monkeypatch.setattr(norm_quant, "ENABLED", True)
    on = run_ranks(2, lambda g: greedy(TpEngineCore(config, g)))
    assert any(handed)
    assert on == off


def test_on_unless_switched_off() -> None:
    """The default (measured on the H200): on; only HEADRACE_FP8_NORM_QUANT=0 turns it off."""
    import subprocess
    import sys

    code = "from cuda import norm_quant; print(norm_quant.ENABLED)"
    for value, want in ((None, "True"), ("0", "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != "HEADRACE_FP8_NORM_QUANT"}
        if value is not None:
            env["HEADRACE_FP8_NORM_QUANT"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == want, (value, out.stderr[-500:])


def test_launch_arguments_match_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatcher's launch (kernel selection forced on CPU tensors, nothing run): the
    argument types and count of the kernel's parameter list, add_rms_norm_vec's geometry."""
    from cuda import compiler
    from tests.kernel_signatures import kernel_parameters

    launched: list[tuple] = []

    class Module:
        def kernel(self, name: str) -> str:
            return name

    monkeypatch.setattr(norm_quant, "kernel_ok", lambda x, r, w: True)
    monkeypatch.setattr(compiler, "load_module", lambda *a, **kw: Module())
    monkeypatch.setattr(
        compiler, "launch", lambda k, grid, block, *args: launched.append((k, grid, block, args))
    )
    t, h = 5, 4096
    x = torch.randn(t, h).to(torch.bfloat16)
    w = torch.ones(h, dtype=torch.bfloat16)
    for res, scale in ((None, None), (x.clone(), torch.tensor([0.5]))):
        norm_quant.add_rms_norm_quant(x, res, w, 1e-5, scale)
    params = kernel_parameters(norm_quant.source())[norm_quant.KERNEL]
    for kernel, grid, block, args in launched:
        assert kernel == norm_quant.KERNEL and grid == (t,) and block == 512  # H / 8 threads
        assert [type(a) for a in args] == [typ for _, typ in params]
    (_, _, _, no_res), (_, _, _, with_res) = launched
    names = [n for n, _ in params]
    assert no_res[names.index("residual")] == 0 and with_res[names.index("residual")] != 0
    assert no_res[names.index("static_scale")] == 0 and with_res[names.index("static_scale")] != 0
