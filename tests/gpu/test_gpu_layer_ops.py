"""LayerNorm, GELU and partial-rotary kernels against their torch references, and the
grouped mixture-of-experts path against the per-expert loop, eagerly and in a CUDA graph
(GPU only). Outputs are poisoned with NaN first where the op takes an output buffer."""

from __future__ import annotations

import pytest
import torch

from cuda import fused_ops as fo
from cuda import layer_ops as lo
from worker.models.moe import experts_grouped, experts_ref, grouped_supported, route

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("hidden", [64, 100, 4544, 8192])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_kernel(dtype: torch.dtype, hidden: int) -> None:
    wide = torch.randn(37, hidden + 8, device="cuda", dtype=dtype) * 2 + 0.5
    x = wide[:, :hidden]  # strided rows, as a view into a wider buffer
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    b = torch.randn(hidden, device="cuda", dtype=dtype)
    assert lo.layer_norm_supported(x, w, b)
    out = lo.layer_norm(x, w, b, 1e-5)
    ref = lo.layer_norm_ref(x.float(), w.float(), b.float(), 1e-5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=TOL[dtype], atol=TOL[dtype] * 4)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_kernel(dtype: torch.dtype, approximate: str) -> None:
    x = torch.randn(29, 18176, device="cuda", dtype=dtype) * 3
    out = lo.gelu(x, approximate)
    ref = lo.gelu_ref(x.float(), approximate)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=TOL[dtype], atol=TOL[dtype])
    # Same rounding point as the reference in the input dtype: at most one ulp apart.
    torch.testing.assert_close(out, lo.gelu_ref(x, approximate), rtol=TOL[dtype], atol=1e-6)


@pytest.mark.parametrize("rotary_dim", [16, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_rotary_kernel(dtype: torch.dtype, rotary_dim: int) -> None:
    T, H, D = 41, 4, 64
    qkv = torch.randn(T, 3 * H * D, device="cuda", dtype=dtype)
    q, k = qkv[:, : H * D].view(T, H, D), qkv[:, H * D : 2 * H * D].view(T, H, D)
    positions = torch.randint(0, 500, (T,), device="cuda")
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device="cuda").float() / rotary_dim))
    freqs = torch.outer(torch.arange(512, device="cuda").float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    rq, rk = q.clone(), k.clone()
    fo.rotary_ref(positions, rq, rk, cos_sin)
    before = qkv.clone()
    fo.rotary(positions, q, k, cos_sin)
    torch.testing.assert_close(q, rq, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(k, rk, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(q[..., rotary_dim:], before[:, : H * D].view(T, H, D)[..., rotary_dim:])
    assert torch.equal(qkv[:, 2 * H * D :], before[:, 2 * H * D :])  # v untouched


def _experts(num_tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    E, H, inter = 8, 1024, 512
    bf = torch.bfloat16
    x = torch.randn(num_tokens, H, generator=g, device="cuda", dtype=bf)
    w_gate_up = torch.randn(E, 2 * inter, H, generator=g, device="cuda", dtype=bf) * 0.03
    w_down = torch.randn(E, H, inter, generator=g, device="cuda", dtype=bf) * 0.03
    logits = torch.randn(num_tokens, E, generator=g, device="cuda")
    return x, logits, w_gate_up, w_down


@pytest.mark.parametrize("num_tokens", [1, 2, 7, 64, 513])
def test_grouped_moe_equals_reference(num_tokens: int) -> None:
    x, logits, w_gate_up, w_down = _experts(num_tokens, num_tokens)
    assert grouped_supported(x, w_gate_up)
    weights, ids = route(logits, 2)
    ref = experts_ref(x.float(), weights, ids, w_gate_up.float(), w_down.float())
    got = experts_grouped(x, weights, ids, w_gate_up, w_down)
    low = experts_ref(x, weights, ids, w_gate_up, w_down)  # bf16 torch, the accuracy bar
    err = (got.float() - ref).abs().max().item()
    base = (low.float() - ref).abs().max().item()
    assert err <= 2 * base + 1e-3, f"grouped error {err:.3g} vs bf16 loop {base:.3g}"


def test_grouped_moe_in_cuda_graph() -> None:
    x, logits, w_gate_up, w_down = _experts(16, 3)
    static_x, static_logits = x.clone(), logits.clone()

    def step() -> torch.Tensor:
        weights, ids = route(static_logits, 2)
        return experts_grouped(static_x, weights, ids, w_gate_up, w_down)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (4, 5):  # new tokens, new routing: the graph follows them
        x2, logits2, _, _ = _experts(16, seed)
        static_x.copy_(x2)
        static_logits.copy_(logits2)
        graph.replay()
        torch.cuda.synchronize()
        weights, ids = route(logits2, 2)
        assert torch.equal(out, experts_grouped(x2, weights, ids, w_gate_up, w_down))
