"""Falcon (FalconForCausalLM), rotary models only (alibi is refused in model_config.py).

Two layouts, both run by worker/models/layernorm_decoder.py:
- 7B: multi-query attention (one KV head), one LayerNorm feeding attention and MLP in
  parallel; query_key_value rows are [Hq*D | D | D] (already q | k | v).
- new_decoder_architecture (40B, 180B): grouped KV heads, ln_attn and ln_mlp; the fused
  rows are [Hkv, group + 2, D] (a group's query heads, its key, its value), reordered at
  load time into q | k | v (weights.qkv_rows).
`bias` puts biases on every linear layer; the LM head is tied to the embedding by default.
"""

from __future__ import annotations

from worker.models.layernorm_decoder import LayerNormCausalLM
from worker.models.weights import Target, qkv_rows, weight_and_bias


class FalconForCausalLM(LayerNormCausalLM):
    def checkpoint_targets(self) -> dict[str, Target]:
        c = self.config
        rows = qkv_rows(c.qkv_layout, c.num_heads, c.num_kv_heads, c.head_dim)
        targets = {"transformer.word_embeddings.weight": Target("embed_tokens.weight")}
        targets.update(weight_and_bias("transformer.ln_f", "norm", True))
        if not c.tie_word_embeddings:
            targets["lm_head.weight"] = Target("lm_head.weight")
        new_arch = c.qkv_layout == "per_kv_group"
        for i in range(c.num_layers):
            src, dst = f"transformer.h.{i}", f"layers.{i}"
            norms = [("input_layernorm", "input_layernorm")]
            if new_arch and not c.shared_norm:
                norms = [("ln_attn", "input_layernorm"), ("ln_mlp", "post_attention_layernorm")]
            elif not c.parallel_attn:
                norms.append(("post_attention_layernorm", "post_attention_layernorm"))
            for name, ours in norms:
                targets.update(weight_and_bias(f"{src}.{name}", f"{dst}.{ours}", True))
            qkv = f"{dst}.self_attn.qkv_proj"
            targets.update(
                weight_and_bias(
                    f"{src}.self_attention.query_key_value", qkv, c.attention_bias, rows
                )
            )
            attn_out = f"{src}.self_attention.dense"
            targets.update(weight_and_bias(attn_out, f"{dst}.self_attn.o_proj", c.o_proj_bias))
            for name in ("dense_h_to_4h", "dense_4h_to_h"):
                targets.update(
                    weight_and_bias(f"{src}.mlp.{name}", f"{dst}.mlp.{name}", c.mlp_bias)
                )
        return targets
