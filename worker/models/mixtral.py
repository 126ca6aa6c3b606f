"""Mixtral: Mistral (worker/models/llama.py) with a sparse mixture-of-experts MLP.

Each decoder layer's MLP is worker/models/moe.py's SparseMoE: a router picks
num_experts_per_tok of num_local_experts gated-SiLU experts per token. Attention, norms,
rotary and the sliding window are Mistral's.

Checkpoint names (Hugging Face): model.layers.N.block_sparse_moe.gate (the router) and
block_sparse_moe.experts.E.{w1 (gate), w3 (up), w2 (down)}, stacked here into
mlp.w_gate_up [E, 2I, H] and mlp.w_down [E, H, I].
"""

from __future__ import annotations

import torch
from torch import nn

from worker.model_config import ModelConfig
from worker.models.llama import LlamaForCausalLM
from worker.models.moe import SparseMoE
from worker.models.weights import Target


class MixtralForCausalLM(LlamaForCausalLM):
    def make_mlp(self, config: ModelConfig) -> nn.Module:
        return SparseMoE(config)

    def mlp_targets(self, src: str, dst: str) -> dict[str, Target]:
        c = self.config
        inter = c.intermediate_size
        moe, mlp = f"{src}.block_sparse_moe", f"{dst}.mlp"
        out = {f"{moe}.gate.weight": Target(f"{mlp}.gate.weight")}
        for e in range(c.num_experts):
            x = f"{moe}.experts.{e}"
            out[f"{x}.w1.weight"] = Target(f"{mlp}.w_gate_up", (e, slice(0, inter)))
            out[f"{x}.w3.weight"] = Target(f"{mlp}.w_gate_up", (e, slice(inter, 2 * inter)))
            out[f"{x}.w2.weight"] = Target(f"{mlp}.w_down", (e,))
        return out

    def quantizable(self, module: str) -> bool:
        # The router stays 16-bit (routing is sensitive, and it is tiny), as in vLLM; the
        # experts are stacked parameters, not linear layers, and stay in the model dtype.
        return super().quantizable(module) and not module.endswith(".mlp.gate")

    def int4_dequantized(self, module: str) -> bool:
        # AWQ / GPTQ Mixtral checkpoints quantize the experts too; they are stacked
        # parameters here, not linear layers, so they are dequantized on load (16-bit).
        return ".experts." in module or super().int4_dequantized(module)

    def graph_blocker(self, dtype: torch.dtype) -> str | None:
        c = self.config
        if dtype != torch.bfloat16 or c.hidden_size % 8 or c.intermediate_size % 8:
            return (
                "mixture-of-experts steps group experts with torch._grouped_mm (bf16, "
                "hidden and intermediate sizes multiples of 8); other shapes run eagerly"
            )
        if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9:
            return "torch._grouped_mm needs compute capability 9.0 or newer"
        return None

    def expert_param_bytes(self) -> tuple[int, float]:
        total = sum(
            p.numel() * p.element_size()
            for name, p in self.named_parameters()
            if name.endswith(("mlp.w_gate_up", "mlp.w_down"))
        )
        return total, self.config.num_experts_per_tok / self.config.num_experts
