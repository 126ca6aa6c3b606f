"""Llama, Mistral and Qwen2: one decoder-only transformer with small variations.

Reads top to bottom: norm, rotary embedding, attention, MLP, decoder layer, model.
T is the number of tokens in the step's flat batch (all requests back to back, no padding),
H the hidden size, Hq / Hkv the query / key-value heads, D the head dim.

Differences handled here: Qwen2 has biases on q/k/v; Mistral may use a sliding window
(Qwen2 too, on the layers its config's `layer_types` name);
Llama 3.1 scales rotary frequencies ("llama3" rope scaling); small models tie the LM head
to the embedding. q/k/v and gate/up projections are fused into one matmul each; the
checkpoint's separate tensors are copied into slices of them at load time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from cuda.fused_ops import add_rms_norm, rotary, silu_and_mul
from worker.attention import AttentionBackend, AttentionMetadata
from worker.model_config import ModelConfig, UnsupportedModelError
from worker.quant.config import Fp8Scheme
from worker.quant.fp8 import Fp8Linear


def make_linear(
    in_features: int, out_features: int, bias: bool, hf_names: list[str], quant: Fp8Scheme | None
) -> nn.Module:
    """nn.Linear, or Fp8Linear when the model runs FP8 and the module is not ignored.

    hf_names: the checkpoint modules this (possibly fused) layer holds; all or none of them
    may be ignored, since one layer has one weight dtype.
    """
    if quant is None:
        return nn.Linear(in_features, out_features, bias=bias)
    ignored = [quant.is_ignored(n) for n in hf_names]
    if any(ignored) and not all(ignored):
        raise UnsupportedModelError(
            f"quantization_config ignore list: {', '.join(hf_names)} are fused into one layer "
            "and must be ignored together or not at all"
        )
    if all(ignored):
        return nn.Linear(in_features, out_features, bias=bias)
    return Fp8Linear(in_features, out_features, bias, static_input=quant.activation == "static")


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


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [D/2], with rope scaling applied (fp32)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    kind = scaling["rope_type"]
    if kind == "linear":
        return (inv_freq / float(scaling["factor"])).float()
    if kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, and blend
        # smoothly between the two wavelength bounds.
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled).float()
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported")


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding (the Hugging Face layout) with an fp32 cos/sin table."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.max_positions = max_positions
        self.cos_sin: torch.Tensor | None = None  # [max_positions, D] = cat(cos, sin) halves

    def build(self, device: torch.device) -> None:
        inv_freq = rope_inv_freq(self.config).to(device)
        t = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """Rotates q [T, Hq, D] and k [T, Hkv, D] in place (views into the fused qkv)."""
        assert self.cos_sin is not None, "RotaryEmbedding.build() was not called"
        rotary(positions, q, k, self.cos_sin)


class Attention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        sliding_window: int | None,
        prefix: str = "model.layers.0",
        quant: Fp8Scheme | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.sliding_window = sliding_window
        p = f"{prefix}.self_attn"
        self.qkv_proj = make_linear(
            config.hidden_size,
            self.q_size + 2 * self.kv_size,
            config.attention_bias,
            [f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"],
            quant,
        )
        self.o_proj = make_linear(self.q_size, config.hidden_size, False, [f"{p}.o_proj"], quant)
        self.rotary = rotary
        self.backend = backend
        # FP8 KV cache: cache = K / k_scale (the checkpoint's k_scale / v_scale, else 1.0).
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        self.rotary(positions, q, k)
        o = self.backend(
            q, k, v, kv_cache, md, self.scale, self.sliding_window, self.k_scale, self.v_scale
        )  # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(
        self, config: ModelConfig, prefix: str = "model.layers.0", quant: Fp8Scheme | None = None
    ) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        p = f"{prefix}.mlp"
        self.gate_up_proj = make_linear(
            config.hidden_size,
            2 * config.intermediate_size,
            config.mlp_bias,
            [f"{p}.gate_proj", f"{p}.up_proj"],
            quant,
        )
        self.down_proj = make_linear(
            config.intermediate_size, config.hidden_size, config.mlp_bias, [f"{p}.down_proj"], quant
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I]: gate | up
        return self.down_proj(silu_and_mul(gate_up))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        index: int,
        quant: Fp8Scheme | None = None,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        prefix = f"model.layers.{index}"
        window = config.layer_sliding_window(index)
        self.self_attn = Attention(config, rotary, backend, window, prefix, quant)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, prefix, quant)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, kv_cache, md)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Also Mistral and Qwen2. forward() returns final hidden states [T, H]; compute_logits()
    projects the rows that need them."""

    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        max_positions: int,
        quant: Fp8Scheme | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.quant = quant
        self.rotary = RotaryEmbedding(config, max_positions)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, self.rotary, backend, i, quant) for i in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],  # one per layer
        md: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, H]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(positions, x, residual, kv_cache, md)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [N, V]

    # ---- weights ----------------------------------------------------------------------------
    def param_slices(self) -> dict[str, tuple[str, int, int]]:
        """Checkpoint tensor name suffix -> (our parameter suffix, row start, row end)."""
        c = self.config
        q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        return {
            "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
            "self_attn.k_proj": ("self_attn.qkv_proj", q, q + kv),
            "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, q + 2 * kv),
            "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
            "mlp.up_proj": ("mlp.gate_up_proj", inter, 2 * inter),
        }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Copy checkpoint tensors (Hugging Face names) into place, one at a time; FP8
        layers take float8 weights and scales, or quantize 16/32-bit weights on the way."""
        from worker.models.weight_loading import load_weights

        load_weights(self, weights, source)
