"""The decoder Falcon and GPT-NeoX share: LayerNorm with bias, GELU MLP, and attention and
MLP either side by side (parallel) or one after the other.

    parallel, shared norm (Falcon-7B)    h = ln(x);          x + attn(h) + mlp(h)
    parallel, two norms (Falcon-40B,     x + attn(ln1(x)) + mlp(ln2(x))
      GPT-NeoX use_parallel_residual)
    sequential (GPT-NeoX without it)     x = x + attn(ln1(x)); x + mlp(ln2(x))

Shapes as in worker/models/layers.py: x [T, H]. The families differ only in checkpoint
names and fused q/k/v row order (worker/models/falcon.py, gpt_neox.py).
"""

from __future__ import annotations

import torch
from torch import nn

from worker.attention import AttentionBackend, AttentionMetadata
from worker.model_config import ModelConfig
from worker.models.base import CausalLM
from worker.models.layers import Attention, GeluMLP, LayerNorm, RotaryEmbedding


class LayerNormDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend
    ) -> None:
        super().__init__()
        self.parallel = config.parallel_attn
        self.shared_norm = config.shared_norm
        self.input_layernorm = LayerNorm(config.hidden_size, config.rms_norm_eps)
        if not self.shared_norm:
            self.post_attention_layernorm = LayerNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rotary, backend)
        self.mlp = GeluMLP(config)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        attn = self.self_attn(positions, h, kv_cache, md)
        if not self.parallel:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        mlp = self.mlp(h if self.shared_norm else self.post_attention_layernorm(x))
        return x + (mlp + attn)


class LayerNormCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, max_positions: int) -> None:
        super().__init__()
        self.build_stack(
            config,
            max_positions,
            lambda i: LayerNormDecoderLayer(config, self.rotary, backend),
            LayerNorm,
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],  # one per layer
        md: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, H]
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(positions, x, kv_cache, md)
        return self.norm(x)
