"""The building blocks every decoder in worker/models/ is made of.

Norms (RMSNorm, LayerNorm with bias), the rotary embedding (full or partial), attention
over the paged KV cache, and the two MLP kinds (gated SiLU, two-layer GELU). Each model file
composes them in its own order; where two families do the same math they share the module.
T is the number of tokens in the step's flat batch, H the hidden size, Hq / Hkv the query /
key-value heads, D the head dim, R the rotary dims (R <= D).

FP8 (--quantization fp8, or an FP8 checkpoint): the model is built with nn.Linear layers,
then `quantize_linears` swaps each one the checkpoint names for an Fp8Linear unless the
quantization_config's ignore list names it; so every family runs FP8 the same way. AWQ /
GPTQ checkpoints swap in Int4Linear layers the same way (modules_to_not_convert stay).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cuda import norm_quant
from cuda.fused_ops import add_rms_norm, rotary, silu_and_mul
from cuda.kv_write_rotary import rotary_write_kv
from cuda.layer_ops import gelu, layer_norm
from worker.attention import AttentionBackend, AttentionMetadata, AttentionParams
from worker.model_config import ModelConfig, UnsupportedModelError
from worker.models.dense import DenseLinear
from worker.models.rope import rope_frequencies
from worker.quant.fp8 import Fp8Input, Fp8Linear
from worker.quant.int4 import Int4Config
from worker.quant.int4_linear import Int4Linear
from worker.quant.scheme import QuantScheme


def no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new residual); with a residual, adds it first. One fused kernel
        on GPU; the torch reference (same rounding) on CPU."""
        return add_rms_norm(x, residual, self.weight, self.eps)

    def forward_for(
        self, x: torch.Tensor, residual: torch.Tensor | None, linear: nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor, Fp8Input | None]:
        """forward(), and where `linear` (the one consumer of the normed rows) is an
        Fp8Linear about to quantize them per token, that quantization from the same launch
        (cuda/norm_quant.py; HEADRACE_FP8_NORM_QUANT=0: never); else None and nothing changes."""
        if not (norm_quant.ENABLED and isinstance(linear, Fp8Linear)):
            return (*self(x, residual), None)
        # x stands in for the normed rows (a fresh tensor of x's shape and dtype): the
        # layer's rule only reads shape, dtype, strides and alignment.
        if not (x.is_contiguous() and x.data_ptr() % 16 == 0 and linear.takes_fp8_input(x)):
            return (*self(x, residual), None)
        out, res, xq, xs = norm_quant.add_rms_norm_quant(
            x, residual, self.weight, self.eps, linear.input_scale
        )
        return out, res, Fp8Input(xq, xs)


class LayerNorm(nn.Module):
    """LayerNorm with a bias (Falcon, GPT-NeoX): mean-centred, fp32 statistics."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return layer_norm(x, self.weight, self.bias, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding (the Hugging Face / NeoX layout) on the first R dims of
    each head, with an fp32 cos/sin table. R < D is GPT-NeoX's partial rotary."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.max_positions = max_positions
        self.cos_sin: torch.Tensor | None = None  # [max_positions, R] = cat(cos, sin) halves

    def build(self, device: torch.device) -> None:
        c = self.config
        inv_freq, scale = rope_frequencies(c.rotary_dim, c.rope_theta, c.rope_scaling)
        t = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.to(device))  # [P, R/2]
        # YaRN scales cos and sin (every kernel reads this table, so none needs to know).
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * scale

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """Rotates q [T, Hq, D] and k [T, Hkv, D] in place (views into the fused qkv)."""
        assert self.cos_sin is not None, "RotaryEmbedding.build() was not called"
        rotary(positions, q, k, self.cos_sin)

    def rotate_and_write(
        self,
        positions: torch.Tensor,  # [T]
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [T]
        k_scale: float,
        v_scale: float,
    ) -> bool:
        """forward(), and on the GPU the step's K/V into the cache in the same launch
        (cuda/kv_write_rotary.py); returns whether it wrote them. On CPU the backend writes
        them, as before (test backends may hold no cache at all)."""
        assert self.cos_sin is not None, "RotaryEmbedding.build() was not called"
        if not kv_cache.is_cuda:
            rotary(positions, q, k, self.cos_sin)
            return False
        rotary_write_kv(positions, q, k, v, kv_cache, slot_mapping, self.cos_sin, k_scale, v_scale)
        return True


class Attention(nn.Module):
    """Fused q/k/v projection (rows q | k | v), rotary, paged attention, output projection.

    Checkpoints that fuse q/k/v differently (GPT-NeoX, Falcon) have their rows reordered
    into this layout at load time (worker/models/weights.py qkv_rows), so one module serves
    every family.
    """

    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.sliding_window = sliding_window  # this layer's (config.layer_sliding_window)
        self.qkv_proj = DenseLinear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = DenseLinear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.rotary = rotary
        self.backend = backend
        self.layer_index = -1  # set by number_layers (per-layer KV lengths need it)
        # FP8 KV cache: cache = K / k_scale (the checkpoint's k_scale / v_scale, else 1.0).
        self.k_scale = 1.0
        self.v_scale = 1.0
        # Tensor parallel: o_proj is row-parallel and this sums the ranks' partial outputs
        # (worker/parallel/layers.py shard_model); one rank: nothing to sum.
        self.out_reduce: Callable[[torch.Tensor], torch.Tensor] = no_reduce

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        x_fp8: Fp8Input | None = None,  # x quantized for an Fp8Linear qkv_proj (RMSNorm)
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x) if x_fp8 is None else self.qkv_proj(x, x_fp8)
        return self.out_reduce(self.o_proj(self.attend(positions, qkv, kv_cache, md)))

    def attend(
        self,
        positions: torch.Tensor,
        qkv: torch.Tensor,  # [T, q_size + 2 kv_size]: the q/k/v projection's output
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
    ) -> torch.Tensor:
        """forward() between the q/k/v and o projections: [T, q_size] for o_proj (the fused
        batch-1 step, worker/models/fused_step.py, runs the projections itself)."""
        T = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        md = md.for_layer(self.layer_index)
        # Rotates q and k in place; on the GPU also writes K/V to the cache (one launch).
        written = self.rotary.rotate_and_write(
            positions, q, k, v, kv_cache, md.slot_mapping, self.k_scale, self.v_scale
        )
        if md.capture is not None:  # KV compression's window: rotated, as K is cached
            md.capture.layers.append(q.index_select(0, md.capture.rows))
        params = AttentionParams(
            self.scale, self.sliding_window, self.k_scale, self.v_scale, kv_written=written
        )
        o = self.backend(q, k, v, kv_cache, md, params)  # [T, Hq, D]
        return o.reshape(T, self.q_size)


def number_layers(model: nn.Module) -> None:
    """Give each Attention its layer index (in module order, which is layer order)."""
    for i, m in enumerate(m for m in model.modules() if isinstance(m, Attention)):
        m.layer_index = i


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused into one matmul (Llama family)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = DenseLinear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias
        )
        self.down_proj = DenseLinear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )
        # Tensor parallel: down_proj is row-parallel, as Attention's o_proj.
        self.out_reduce: Callable[[torch.Tensor], torch.Tensor] = no_reduce

    def forward(self, x: torch.Tensor, x_fp8: Fp8Input | None = None) -> torch.Tensor:
        """x_fp8: x quantized for an Fp8Linear gate_up_proj (RMSNorm.forward_for)."""
        gate_up = self.gate_up_proj(x) if x_fp8 is None else self.gate_up_proj(x, x_fp8)
        # gate_up [T, 2I]: gate | up
        fp8_down = getattr(self.down_proj, "forward_silu_mul", None)  # FP8: quant fused in
        if fp8_down is not None:
            return self.out_reduce(fp8_down(gate_up))
        return self.out_reduce(self.down_proj(silu_and_mul(gate_up)))


class GeluMLP(nn.Module):
    """dense_4h_to_h(gelu(dense_h_to_4h(x))) (Falcon, GPT-NeoX)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.approximate = "none" if config.hidden_act == "gelu" else "tanh"
        self.dense_h_to_4h = DenseLinear(
            config.hidden_size, config.intermediate_size, bias=config.mlp_bias
        )
        self.dense_4h_to_h = DenseLinear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense_h_to_4h(x)  # [T, I]
        return self.dense_4h_to_h(gelu(h, self.approximate))


def make_linear(
    in_features: int,
    out_features: int,
    bias: bool,
    hf_names: list[str],
    quant: QuantScheme | None,
    name: str = "",
) -> nn.Module:
    """nn.Linear, or Fp8Linear / Int4Linear when the model runs FP8 / AWQ / GPTQ and the
    module is not ignored (name: ours, for error messages).

    hf_names: the checkpoint modules this (possibly fused) layer holds; all or none of them
    may be ignored, since one layer has one weight dtype.
    """
    if quant is None:
        return DenseLinear(in_features, out_features, bias=bias)
    ignored = [quant.is_ignored(n) for n in hf_names]
    if any(ignored) and not all(ignored):
        raise UnsupportedModelError(
            f"quantization_config ignore list: {', '.join(hf_names)} are fused into one layer "
            "and must be ignored together or not at all"
        )
    if hf_names and all(ignored):
        return DenseLinear(in_features, out_features, bias=bias)
    if isinstance(quant, Int4Config):
        return Int4Linear(in_features, out_features, bias, quant, name)
    return Fp8Linear(in_features, out_features, bias, static_input=quant.activation == "static")


def quantize_linears(model: nn.Module, quant: QuantScheme, sources: dict[str, list[str]]) -> None:
    """Replace each nn.Linear named in `sources` (our module -> the checkpoint modules it
    holds) by make_linear's choice. Call on the meta device, before weights exist."""
    for name, hf_names in sources.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        layer = make_linear(
            module.in_features, module.out_features, module.bias is not None, hf_names, quant, name
        )
        setattr(model.get_submodule(parent), leaf, layer)
