"""GPT-NeoX (GPTNeoXForCausalLM: Pythia, GPT-NeoX-20B), run by layernorm_decoder.py.

Fused query_key_value rows are laid out per head, [H, 3, D] (each head's q, k, v), and
reordered at load time into q | k | v (weights.qkv_rows). Partial rotary: only the first
rotary_pct * D dims of each head rotate (NeoX-style rotate-half within them).
use_parallel_residual picks parallel or sequential attention and MLP. Every linear layer
has a bias; the output projection embed_out is its own tensor (not tied).
"""

from __future__ import annotations

from worker.models.layernorm_decoder import LayerNormCausalLM
from worker.models.weights import Target, qkv_rows, weight_and_bias


class GPTNeoXForCausalLM(LayerNormCausalLM):
    def checkpoint_targets(self) -> dict[str, Target]:
        c = self.config
        rows = qkv_rows(c.qkv_layout, c.num_heads, c.num_kv_heads, c.head_dim)
        targets = {"gpt_neox.embed_in.weight": Target("embed_tokens.weight")}
        targets.update(weight_and_bias("gpt_neox.final_layer_norm", "norm", True))
        if not c.tie_word_embeddings:
            targets["embed_out.weight"] = Target("lm_head.weight")
        for i in range(c.num_layers):
            src, dst = f"gpt_neox.layers.{i}", f"layers.{i}"
            for norm in ("input_layernorm", "post_attention_layernorm"):
                targets.update(weight_and_bias(f"{src}.{norm}", f"{dst}.{norm}", True))
            qkv, out = f"{src}.attention.query_key_value", f"{src}.attention.dense"
            attn = f"{dst}.self_attn"
            targets.update(weight_and_bias(qkv, f"{attn}.qkv_proj", c.attention_bias, rows))
            targets.update(weight_and_bias(out, f"{attn}.o_proj", c.o_proj_bias))
            for name in ("dense_h_to_4h", "dense_4h_to_h"):
                targets.update(weight_and_bias(f"{src}.mlp.{name}", f"{dst}.mlp.{name}", True))
        return targets
