"""The add + RMSNorm + FP8 quantization kernel (cuda/norm_quant.cu) against the two kernels
it replaces (fused_ops add_rms_norm, then fp8_quant quantize_per_token on its output), byte
for byte: 1 / 9 / 880 / 8192 rows x the model hidden sizes and odd ones the vector norm
kernel takes (one vector a thread, several, a partial last round), with and without a
residual, dynamic and static scales (saturating), all-zero rows (the floor scale), strided
x rows, NaN-poisoned outputs, both dtypes, CUDA-graph replay; then the layer plumbing
(pre-quantized only past the GEMV's rows) and a tiny FP8 model's greedy tokens with
HEADRACE_FP8_NORM_QUANT on and off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cuda import fp8_gemv, norm_quant
from cuda.fp8_quant import FP8, quantize_per_token
from cuda.fused_ops import add_rms_norm
from tests.gpu.helpers import generate
from tests.test_golden import prompts_of_different_lengths
from tests.tiny_models import tiny_model_hd64
from worker.models.layers import RMSNorm
from worker.quant.fp8 import Fp8Input, Fp8Linear, gemm_mode, quantize_weight_per_channel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = torch.device("cuda")
EPS = 1e-5
# 4096 / 8192: Llama-3-8B / 70B; 576: SmolLM2; 8 / 24: a partial warp; 2056: a partial
# second warp; 12296 / 16384: more vectors than threads (the re-read of later vectors).
HIDDEN = [4096, 8192, 576, 8, 24, 2056, 12296, 16384]
TOKENS = [1, 9, 880, 8192]
DTYPES = [torch.bfloat16, torch.float16]


def _inputs(
    t: int, h: int, dtype: torch.dtype, seed: int, pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(t, h + pad, device=DEV, generator=g) * 3).to(dtype)[:, :h]
    res = torch.randn(t, h, device=DEV, generator=g).to(dtype)
    w = (torch.randn(h, device=DEV, generator=g) * 0.5 + 1).to(dtype)
    if t > 1:
        x[1], res[1] = 0, 0  # an all-zero row: out 0, the floor scale
    if t > 2:
        x[2, h - 1] = 200.0  # the amax in the row's last element
    return x, res, w


def _poisoned(t: int, h: int, dtype: torch.dtype) -> norm_quant.Result:
    nan16 = torch.full((t, h), float("nan"), dtype=dtype, device=DEV)
    xq = torch.full((t, h), 0x7F, dtype=torch.uint8, device=DEV).view(FP8)  # e4m3 NaN
    return nan16, nan16.clone(), xq, torch.full((t, 1), float("nan"), device=DEV)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte for byte (NaN == NaN, -0 != +0)."""
    same_kind = a.shape == b.shape and a.dtype == b.dtype
    return same_kind and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _check(x: torch.Tensor, res: torch.Tensor | None, w: torch.Tensor, scale) -> None:
    t, h = x.shape
    assert norm_quant.kernel_ok(x, res, w), (t, h)
    got = norm_quant.add_rms_norm_quant(x, res, w, EPS, scale, out=_poisoned(t, h, x.dtype))
    out, new_res = add_rms_norm(x, res, w, EPS)
    xq, xs = quantize_per_token(out, scale)
    for name, a, b in zip(
        ("out", "residual", "xq", "scales"), got, (out, new_res, xq, xs), strict=True
    ):
        assert _same(a, b), (name, t, h, x.dtype, res is not None, scale is not None)
    assert not bool(torch.isnan(got[0]).any())  # every element written


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("h", HIDDEN)
@pytest.mark.parametrize("t", TOKENS)
def test_fused_equals_norm_then_quant(t: int, h: int, dtype: torch.dtype) -> None:
    x, res, w = _inputs(t, h, dtype, seed=t * 31 + h)
    _check(x, res, w, None)
    _check(x, None, w, None)
    if t in (9, 880):
        static = torch.tensor([0.01], device=DEV)  # x / 0.01 saturates at +-448 often
        _check(x, res, w, static)
        _check(x, None, w, static)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_strided_rows_and_random_shapes(dtype: torch.dtype) -> None:
    _check(*_inputs(37, 4096, dtype, seed=1, pad=64), None)  # x_stride > H
    g = torch.Generator().manual_seed(7)
    for _ in range(10):
        t = int(torch.randint(1, 600, (1,), generator=g))
        h = 8 * int(torch.randint(1, 2500, (1,), generator=g))
        _check(*_inputs(t, h, dtype, seed=t + h), None)


def test_fallbacks_equal_the_unfused_ops() -> None:
    x, res, w = _inputs(9, 4100, torch.bfloat16, seed=3)  # H % 8: the scalar norm kernel
    assert not norm_quant.kernel_ok(x, res, w)
    got = norm_quant.add_rms_norm_quant(x, res, w, EPS)
    out, new_res = add_rms_norm(x, res, w, EPS)
    for a, b in zip(got, (out, new_res, *quantize_per_token(out)), strict=True):
        assert _same(a, b)
    empty = torch.empty(0, 4096, dtype=torch.bfloat16, device=DEV)
    ones = torch.ones(4096, dtype=torch.bfloat16, device=DEV)
    shapes = [tuple(r.shape) for r in norm_quant.add_rms_norm_quant(empty, empty, ones, EPS)]
    assert shapes == [(0, 4096), (0, 4096), (0, 4096), (0, 1)]


def test_cuda_graph_replay_matches_eager() -> None:
    t, h, dtype = 880, 4096, torch.bfloat16
    x = torch.empty(t, h, dtype=dtype, device=DEV)
    res = torch.empty_like(x)
    w = (torch.rand(h, device=DEV) + 0.5).to(dtype)
    static = torch.tensor([0.02], device=DEV)

    def fill(seed: int) -> None:
        nx, nr, _ = _inputs(t, h, dtype, seed)
        x.copy_(nx)
        res.copy_(nr)

    def step() -> tuple[norm_quant.Result, norm_quant.Result]:
        return (
            norm_quant.add_rms_norm_quant(x, res, w, EPS),
            norm_quant.add_rms_norm_quant(x, res, w, EPS, static),
        )

    fill(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # load the modules outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dynamic_out, static_out = step()
    for seed in (1, 2, 3):
        fill(seed)
        graph.replay()
        out, new_res = add_rms_norm(x, res, w, EPS)
        for got, scale in ((dynamic_out, None), (static_out, static)):
            for a, b in zip(got, (out, new_res, *quantize_per_token(out, scale)), strict=True):
                assert _same(a, b), seed


def _fp8_layer(k: int, n: int, static: bool) -> Fp8Linear:
    layer = Fp8Linear(k, n, bias=False, static_input=static).to(DEV)
    wq, ws = quantize_weight_per_channel(torch.randn(n, k, device=DEV) * 0.02)
    layer.weight.data, layer.weight_scale.data = wq, ws
    if layer.input_scale is not None:
        layer.input_scale.data.fill_(0.02)
    return layer


@pytest.mark.parametrize("gemv", ["new", "0"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_rmsnorm_hands_over_past_the_gemv(
    static: bool, gemv: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pre-quantized exactly where the layer would quantize (HEADRACE_FP8_GEMV=0: every
    batch), and the layer's output bit-identical to the unfused path's."""
    assert gemm_mode(DEV) == "rowwise"
    monkeypatch.setattr(norm_quant, "ENABLED", True)
    monkeypatch.setattr(fp8_gemv, "MODE", gemv)
    h = 4096
    norm = RMSNorm(h, EPS).to(DEV, torch.bfloat16)
    norm.weight.data = (torch.rand(h, device=DEV) + 0.5).to(torch.bfloat16)
    layer = _fp8_layer(h, 6144, static)
    for t in (1, 8, 9, 880):
        x, res, _ = _inputs(t, h, torch.bfloat16, seed=t)
        normed, new_res, pre = norm.forward_for(x, res, layer)
        want, want_res = norm(x, res)
        assert torch.equal(normed, want) and torch.equal(new_res, want_res)
        assert (pre is not None) == (t > fp8_gemv.MAX_ROWS[gemv]), (t, gemv)
        if pre is not None:
            assert isinstance(pre, Fp8Input)
            assert torch.equal(layer(normed, pre), layer(want)), t


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_tiny_fp8_model_greedy_equal_with_the_fusion(
    tmp_path: Path, stories_path: Path, eager: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_model_hd64(tmp_path, stories_path)
    prompts = prompts_of_different_lengths()
    args = dict(
        device="cuda",
        dtype="bfloat16",
        block_size=16,
        max_num_seqs=32,
        max_model_len=512,
        quantization="fp8",
        kv_cache_dtype="fp8",
        enforce_eager=eager,
    )
    off = generate(path, prompts, max_tokens=40, **args)
    calls = []
    real = norm_quant.add_rms_norm_quant

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(a[0].shape[0])
        return real(*a, **kw)

    monkeypatch.setattr(norm_quant, "ENABLED", True)
    monkeypatch.setattr(norm_quant, "add_rms_norm_quant", spy)
    on = generate(path, prompts, max_tokens=40, **args)
    assert calls and min(calls) > fp8_gemv.MAX_ROWS[fp8_gemv.MODE]  # it ran, past the GEMV
    assert [o[0] for o in on.out] == [o[0] for o in off.out]  # greedy tokens, every request
