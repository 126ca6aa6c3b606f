"""Llama, Mistral and Qwen2: one decoder-only transformer with small variations.

Reads top to bottom: decoder layer, model, weight names; the pieces (RMSNorm, rotary,
attention over the paged KV cache, gated MLP) live in worker/models/layers.py.
T is the number of tokens in the step's flat batch (all requests back to back, no padding),
H the hidden size, Hq / Hkv the query / key-value heads, D the head dim.

Differences handled here: Qwen2 has biases on q/k/v; Mistral may use a sliding window
(Qwen2 too, on the layers its config's `layer_types` name);
Llama 3.1 scales rotary frequencies ("llama3" rope scaling); small models tie the LM head
to the embedding. q/k/v and gate/up projections are fused into one matmul each; the
checkpoint's separate tensors are copied into slices of them at load time. Mixtral
(worker/models/mixtral.py) is this model with a mixture-of-experts MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.attention import AttentionBackend, AttentionMetadata
from worker.model_config import ModelConfig
from worker.models import fused_step
from worker.models.base import CausalLM
from worker.models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding
from worker.models.weights import Target

MLP = GatedMLP  # the name this module used to define


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        index: int = 0,
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rotary, backend, config.layer_sliding_window(index))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp if mlp is not None else GatedMLP(config)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # residual None: x is the hidden state
        if fused_step.applies(self, x):  # batch-1 decode: norms and adds inside the GEMVs
            return fused_step.layer_forward(self, positions, x, residual, kv_cache, md)
        # FP8 q/k/v and gate/up: the norms may quantize their rows for them (hq).
        attn = self.self_attn
        h, residual, hq = self.input_layernorm.forward_for(x, residual, attn.qkv_proj)
        h = attn(positions, h, kv_cache, md, hq)
        gate_up = getattr(self.mlp, "gate_up_proj", None)  # None: mixture of experts
        h, residual, hq = self.post_attention_layernorm.forward_for(h, residual, gate_up)
        return (self.mlp(h) if hq is None else self.mlp(h, hq)), residual


class LlamaForCausalLM(CausalLM):
    """Also Mistral and Qwen2. forward() returns final hidden states [T, H]; compute_logits()
    projects the rows that need them."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, max_positions: int) -> None:
        super().__init__()
        self.build_stack(
            config,
            max_positions,
            lambda i: DecoderLayer(config, self.rotary, backend, i, self.make_mlp(config)),
            RMSNorm,
        )

    def make_mlp(self, config: ModelConfig) -> nn.Module:
        return GatedMLP(config)

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

    # ---- weights ----------------------------------------------------------------------------
    def checkpoint_targets(self) -> dict[str, Target]:
        c = self.config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        targets = {
            "model.embed_tokens.weight": Target("embed_tokens.weight"),
            "model.norm.weight": Target("norm.weight"),
        }
        if not c.tie_word_embeddings:
            targets["lm_head.weight"] = Target("lm_head.weight")
        attn = [("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)]
        for i in range(c.num_layers):
            src, dst = f"model.layers.{i}", f"layers.{i}"
            for norm in ("input_layernorm", "post_attention_layernorm"):
                targets[f"{src}.{norm}.weight"] = Target(f"{dst}.{norm}.weight")
            for name, a, b in attn:
                for kind in ("weight", "bias") if c.attention_bias else ("weight",):
                    targets[f"{src}.self_attn.{name}.{kind}"] = Target(
                        f"{dst}.self_attn.qkv_proj.{kind}", (slice(a, b),)
                    )
            for kind in ("weight", "bias") if c.o_proj_bias else ("weight",):
                targets[f"{src}.self_attn.o_proj.{kind}"] = Target(f"{dst}.self_attn.o_proj.{kind}")
            targets.update(self.mlp_targets(f"{src}", f"{dst}"))
        return targets

    def mlp_targets(self, src: str, dst: str) -> dict[str, Target]:
        inter = self.config.intermediate_size
        parts = [("gate_proj", "gate_up_proj", 0, inter)]
        parts += [("up_proj", "gate_up_proj", inter, 2 * inter), ("down_proj", "down_proj", 0, 0)]
        out = {}
        for name, ours, a, b in parts:
            index = (slice(a, b),) if b else ()
            for kind in ("weight", "bias") if self.config.mlp_bias else ("weight",):
                out[f"{src}.mlp.{name}.{kind}"] = Target(f"{dst}.mlp.{ours}.{kind}", index)
        return out
