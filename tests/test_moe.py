"""Mixture-of-experts routing and expert sums on CPU: routing as transformers computes it,
the grouped (sorted, one GEMM per expert) path against the per-expert reference loop, and
the grouped path's ops: none that syncs the host (CUDA graphs capture it), few kernels."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from worker.model_config import ModelConfig
from worker.models.moe import SparseMoE, experts_grouped, experts_ref, route, sort_by_expert


def _hf_block(num_experts: int, top_k: int) -> MixtralSparseMoeBlock:
    cfg = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=48, num_local_experts=num_experts,
        num_experts_per_tok=top_k,
    )  # fmt: skip
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


def _ours(block: MixtralSparseMoeBlock, num_experts: int, top_k: int) -> SparseMoE:
    cfg = ModelConfig.from_hf(
        dict(
            architectures=["MixtralForCausalLM"], hidden_size=32, intermediate_size=48,
            num_hidden_layers=1, num_attention_heads=4, vocab_size=16,
            num_local_experts=num_experts, num_experts_per_tok=top_k,
        )
    )  # fmt: skip
    moe = SparseMoE(cfg)
    with torch.no_grad():
        moe.gate.weight.copy_(block.gate.weight)
        moe.w_gate_up.copy_(block.experts.gate_up_proj)  # [E, 2I, H]: gate | up
        moe.w_down.copy_(block.experts.down_proj)  # [E, H, I]
    return moe


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 2), (8, 2), (4, 1), (4, 4)])
def test_sparse_moe_matches_transformers(num_experts: int, top_k: int) -> None:
    block = _hf_block(num_experts, top_k)
    moe = _ours(block, num_experts, top_k)
    x = torch.randn(1, 37, 32)
    with torch.no_grad():
        expected = block(x)[0]
        _, hf_w, hf_ids = block.gate(x[0])
        weights, ids = route(moe.gate(x[0]), top_k)
        got = moe(x[0])
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sort_by_expert_is_a_stable_counting_sort() -> None:
    ids = torch.tensor([[2, 0], [1, 2], [2, 3], [0, 1], [3, 2]])
    dest, ends = sort_by_expert(ids, 5)
    assert ends.tolist() == [2, 4, 8, 10, 10]  # expert 4 routed nothing
    order = torch.empty_like(dest)
    order[dest] = torch.arange(ids.numel())
    flat = ids.flatten()
    assert flat[order].tolist() == sorted(flat.tolist())
    expected = sorted(range(ids.numel()), key=lambda p: (int(flat[p]), p))  # stable
    assert order.tolist() == expected


@pytest.mark.parametrize("num_tokens", [1, 3, 64])
def test_grouped_experts_equal_reference(num_tokens: int) -> None:
    g = torch.Generator().manual_seed(num_tokens)
    E, H, inter, k = 8, 32, 48, 2
    x = torch.randn(num_tokens, H, generator=g)
    w_gate_up = torch.randn(E, 2 * inter, H, generator=g) * 0.2
    w_down = torch.randn(E, H, inter, generator=g) * 0.2
    weights, ids = route(torch.randn(num_tokens, E, generator=g), k)
    ref = experts_ref(x, weights, ids, w_gate_up, w_down)
    grouped = experts_grouped(x, weights, ids, w_gate_up, w_down)
    torch.testing.assert_close(grouped, ref, rtol=1e-5, atol=1e-5)


class _OpLog(TorchDispatchMode):
    """The aten ops a block of code dispatches (each non-view op is a kernel on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


# Ops that read a device value on the host (data-dependent shapes, Python scalars): each
# stalls the step and breaks CUDA graph capture.
HOST_SYNC_OPS = {
    "nonzero",
    "_local_scalar_dense",
    "masked_select",
    "_unique2",
    "unique_dim",
    "bincount",
    "equal",
    "is_nonzero",
    "repeat_interleave",
}


@pytest.mark.parametrize("num_tokens", [1, 8])
def test_grouped_moe_layer_has_no_host_sync_and_few_kernels(num_tokens: int) -> None:
    g = torch.Generator().manual_seed(0)
    E, H, inter, k = 8, 64, 96, 2
    x = torch.randn(num_tokens, H, generator=g).bfloat16()
    gate = torch.randn(E, H, generator=g).bfloat16()
    w_gate_up = torch.randn(E, 2 * inter, H, generator=g).bfloat16()
    w_down = torch.randn(E, H, inter, generator=g).bfloat16()
    with _OpLog() as log:
        weights, ids = route(F.linear(x, gate), k)
        experts_grouped(x, weights, ids, w_gate_up, w_down)
    names = [op.overloadpacket.__name__ for op in log.ops]
    assert not HOST_SYNC_OPS & set(names), names
    kernels = [n for op, n in zip(log.ops, names, strict=True) if not op.is_view]
    kernels = [n for n in kernels if n not in ("empty", "empty_like")]
    # The decode step replays these per MoE layer (x32 for Mixtral): the router's GEMM,
    # top-k and softmax, 9 for the counting sort, 2 grouped GEMMs, the rest gathers and
    # the weighted sum. On a GPU two fewer: the softmax casts in its kernel, silu_and_mul
    # is one fused kernel (two ops here).
    assert len(kernels) <= 25, kernels
    # The detector sees a sync where there is one: the reference loop's torch.where.
    with _OpLog() as log:
        experts_ref(x, weights, ids, w_gate_up, w_down)
    assert "nonzero" in {op.overloadpacket.__name__ for op in log.ops}
