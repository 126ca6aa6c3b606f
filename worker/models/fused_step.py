"""The batch-1 decode layer with its small kernels folded into the GEMVs (issue 11, round 2).

A Llama-family DecoderLayer is add+RMSNorm, q/k/v, attention, o, add+RMSNorm, gate/up,
SiLU-and-mul, down: at batch 1 the five elementwise launches around the four GEMVs cost
~2 us each (65 add_rms_norm, 32 silu_and_mul and 64 cuBLAS split-K reduces per step on
the 8B model). Here, on the GPU for decode-sized steps whose projections the GEMV rule
(cuda/gemv.py) sends to cuda/gemv_step.cu:

    q/k/v      = gemv2_norm(hidden, input_layernorm)        RMSNorm in the prologue
    hidden     = gemv2(attention, o, residual=hidden)       residual add in the epilogue
    gate/up    = gemv2_norm(hidden, post_attention_layernorm)   (if gate/up takes the GEMV;
                 else RMSNorm + cuBLAS)
    hidden     = gemv2_silu(gate/up, down, residual=hidden) SiLU-and-mul in the prologue
    (where gate/up takes the GEMV too: act = gemv2_norm_pair(hidden, ...), silu_and_mul as
    the gate/up GEMV's epilogue, then hidden = gemv2(act, down, residual=hidden))

The layer contract stays DecoderLayer's: (x, residual) in and out, the hidden state being
x + residual, or x alone where residual is None (what the fused layer returns when its last
GEMV added the residual itself). Each fusion is switched by HEADRACE_GEMV_FUSION
(cuda/step_fusion.py); one that is off, or that a shape or layout does not fit, runs the
unfused op, so every combination computes the same math (the references' rounding).
"""

from __future__ import annotations

from typing import Any

import torch

from cuda import gemv, gemv_step
from cuda.fused_ops import silu_and_mul
from cuda.step_fusion import gemv_fusions
from worker.attention import AttentionMetadata
from worker.models.dense import DenseLinear
from worker.models.layers import no_reduce

MAX_TOKENS = gemv_step.MAX_ROWS["norm"]  # steps of more tokens run the unfused layer


def _gemv_linear(layer: Any, x: torch.Tensor, mode: str) -> bool:
    """Does this DenseLinear's call on x go to round 2's GEMV under the rule?"""
    if type(layer) is not DenseLinear or mode in ("cublas", "old"):
        return False
    n, k = layer.weight.shape
    return gemv.use_gemv(x.shape[0], n, k, x.element_size(), mode)


def applies(layer: Any, x: torch.Tensor) -> bool:
    """Host-side test, cheap: the fused layer for this layer and step?"""
    if not (x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_TOKENS):
        return False
    if x.dtype not in gemv_step.DTYPES or not gemv_fusions():
        return False
    attn = layer.self_attn
    mode = gemv.gemv_mode()
    if attn.out_reduce is not no_reduce:  # tensor parallel: the ranks' sums
        return False
    return _gemv_linear(attn.qkv_proj, x, mode) and _gemv_linear(attn.o_proj, x, mode)


def _norm_gemv(norm: Any, hidden: torch.Tensor, linear: Any, fused: bool) -> torch.Tensor:
    """linear(RMSNorm(hidden)): one launch where the norm fusion and the layout allow."""
    w, b = linear.weight, linear.bias
    if fused and gemv_step.supported("norm", hidden, w, b, None, norm.weight):
        return gemv_step.run("norm", hidden, w, b, None, norm.weight, norm.eps)
    normed, _ = norm(hidden, None)
    return linear(normed)


def _residual_gemv(
    x: torch.Tensor, linear: Any, hidden: torch.Tensor, prologue: str = ""
) -> torch.Tensor | None:
    """linear(x') + hidden in one launch, or None where the layout does not fit."""
    w, b = linear.weight, linear.bias
    if not gemv_step.supported(prologue, x, w, b, hidden):
        return None
    return gemv_step.run(prologue, x, w, b, hidden)


def layer_forward(
    layer: Any,
    positions: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DecoderLayer.forward with the fusions that are on (`applies` said yes)."""
    parts = gemv_fusions()
    attn = layer.self_attn
    if residual is None:  # x is the hidden state: its norm can go into the q/k/v GEMV
        hidden = x
        qkv = _norm_gemv(layer.input_layernorm, hidden, attn.qkv_proj, "norm" in parts)
    else:
        h, hidden = layer.input_layernorm(x, residual)
        qkv = attn.qkv_proj(h)
    o = attn.attend(positions, qkv, kv_cache, md)
    summed = _residual_gemv(o, attn.o_proj, hidden) if "residual" in parts else None
    if summed is None:
        normed, hidden = layer.post_attention_layernorm(attn.o_proj(o), hidden)
        return _mlp_step(layer, hidden, parts, normed)
    return _mlp_step(layer, summed, parts, None)


def _mlp_step(
    layer: Any,
    hidden: torch.Tensor,
    parts: frozenset[str],
    normed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The MLP half: (output, residual) as DecoderLayer returns them. normed: the post-
    attention norm's output where the unfused add+norm ran already."""
    mlp = layer.mlp
    norm = layer.post_attention_layernorm
    gated = type(getattr(mlp, "gate_up_proj", None)) is DenseLinear
    gated = gated and type(getattr(mlp, "down_proj", None)) is DenseLinear
    if not gated or getattr(mlp, "out_reduce", None) is not no_reduce:  # MoE, FP8, tensor parallel
        if normed is None:
            normed, _ = norm(hidden, None)
        return mlp(normed), hidden
    mode = gemv.gemv_mode()
    act, gate_up = _gate_up(layer, hidden, parts, normed, mode)
    down = mlp.down_proj
    on_gemv = _gemv_linear(down, hidden, mode)
    if act is None and on_gemv and "silu" in parts:
        if "residual" in parts:
            out = _residual_gemv(gate_up, down, hidden, "silu")
            if out is not None:
                return out, None
        if gemv_step.supported("silu", gate_up, down.weight, down.bias, None):
            return gemv_step.run("silu", gate_up, down.weight, down.bias), hidden
    if act is None:
        act = silu_and_mul(gate_up)
    if on_gemv and "residual" in parts:
        out = _residual_gemv(act, down, hidden)
        if out is not None:
            return out, None
    return down(act), hidden


def _gate_up(
    layer: Any,
    hidden: torch.Tensor,
    parts: frozenset[str],
    normed: torch.Tensor | None,
    mode: str,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(silu(gate) * up, or None where not computed yet; gate/up) of the post-attention norm.
    Where gate/up takes the GEMV with the norm and SiLU fusions on, one launch gives the
    activation (gemv2_norm_pair: silu_and_mul as the GEMV's epilogue)."""
    mlp = layer.mlp
    norm = layer.post_attention_layernorm
    gu = mlp.gate_up_proj
    if normed is not None:
        return None, gu(normed)
    fused = "norm" in parts and _gemv_linear(gu, hidden, mode)
    pair_ok = gemv_step.supported("norm_pair", hidden, gu.weight, gu.bias, None, norm.weight)
    if fused and "silu" in parts and pair_ok:
        act = gemv_step.run("norm_pair", hidden, gu.weight, gu.bias, None, norm.weight, norm.eps)
        return act, act
    return None, _norm_gemv(norm, hidden, gu, fused)
