"""What every causal LM in worker/models/ offers the runner, and the shared weight plumbing.

A model's forward() takes the step's flat token batch and returns final hidden states
[T, H]; compute_logits() projects the rows that need them. Our parameter names are the
same across families (embed_tokens, layers.N...., norm, lm_head); each model maps its
checkpoint's names onto them in checkpoint_targets().
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from worker.attention import AttentionMetadata
from worker.model_config import ModelConfig
from worker.models.dense import DenseLinear
from worker.models.int4_weights import int4_targets
from worker.models.layers import RotaryEmbedding, quantize_linears
from worker.models.weights import Target, load_checkpoint, scale_targets
from worker.quant.int4 import Int4Config
from worker.quant.scheme import QuantScheme


class CausalLM(nn.Module):
    config: ModelConfig
    rotary: RotaryEmbedding
    embed_tokens: nn.Embedding
    lm_head: nn.Linear
    quant_scheme: QuantScheme | None = None  # set by quantize()

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],  # one per layer
        md: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H]
        raise NotImplementedError

    def build_stack(
        self,
        config: ModelConfig,
        max_positions: int,
        make_layer: Callable[[int], nn.Module],
        norm: Callable[[int, float], nn.Module],
    ) -> None:
        """What every family's model holds, in this order: the rotary tables, the token
        embedding, decoder layers `make_layer(0..L-1)` (which may use self.rotary), the final
        `norm`, and the LM head (tied to the embedding when the config says so)."""
        self.config = config
        self.rotary = RotaryEmbedding(config, max_positions)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([make_layer(i) for i in range(config.num_layers)])
        self.norm = norm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = DenseLinear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [N, V]

    def greedy_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] whose row argmax is compute_logits's, for callers that want only
        the argmax: the LM head's output in the model's dtype, without the fp32 copy (the
        cast is exact and keeps the order; cuda/argmax.py reads 16-bit rows). A model whose
        compute_logits does more (a soft cap, a scale) gets compute_logits itself unless it
        overrides this with math that provably keeps the argmax."""
        if type(self).compute_logits is not CausalLM.compute_logits:
            return self.compute_logits(hidden)
        return self.lm_head(hidden)  # [N, V]

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- weights ----------------------------------------------------------------------------
    def checkpoint_targets(self) -> dict[str, Target]:
        """Every checkpoint tensor the model needs -> where it goes."""
        raise NotImplementedError

    def skip_tensor(self, name: str) -> bool:
        """Checkpoint tensors we do not load (buffers the checkpoint saved, tied heads)."""
        if name.endswith(("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")):
            return True
        return self.config.tie_word_embeddings and name in ("lm_head.weight", "embed_out.weight")

    def load_targets(self) -> dict[str, Target]:
        """checkpoint_targets() plus the FP8 scales that go with them (weights.scale_targets);
        a 4-bit model's quantized layers by their AWQ / GPTQ parts (int4_weights)."""
        targets = self.checkpoint_targets()
        scales = scale_targets(self, targets)
        if isinstance(self.quant_scheme, Int4Config):
            targets = int4_targets(self, targets, self.quant_scheme, self.int4_dequantized)
        return targets | scales

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Copy checkpoint tensors (Hugging Face names) into place, one at a time; FP8
        layers take float8 weights and scales, or quantize 16/32-bit weights on the way."""
        load_checkpoint(self, weights, source, self.load_targets(), self.skip_tensor)

    # ---- FP8 ---------------------------------------------------------------------------------
    def quantizable(self, module: str) -> bool:
        """Linear layers FP8 may replace: all but the LM head (as vLLM, kept 16-bit)."""
        return module != "lm_head"

    def quantize(self, quant: QuantScheme) -> None:
        """Swap the quantizable linear layers for Fp8Linear / Int4Linear (on the meta device)."""
        self.quant_scheme = quant
        sources: dict[str, list[str]] = {}
        for name, t in self.checkpoint_targets().items():
            if t.kind == "param" and name.endswith(".weight") and t.param.endswith(".weight"):
                module = t.param.removesuffix(".weight")
                if self.quantizable(module):
                    sources.setdefault(module, []).append(name.removesuffix(".weight"))
        quantize_linears(self, quant, sources)

    def int4_dequantized(self, module: str) -> bool:
        """Checkpoint modules that are 4-bit in an AWQ / GPTQ file but that this model keeps
        16-bit (dequantized on load): the LM head of a GPTQ `lm_head: true` checkpoint (the
        head stays 16-bit, as under FP8), and Mixtral's experts."""
        q = self.quant_scheme
        return isinstance(q, Int4Config) and q.lm_head and module in ("lm_head", "embed_out")

    def graph_blocker(self, dtype: torch.dtype) -> str | None:
        """Why this model's decode steps cannot run in a CUDA graph (beyond attention)."""
        return None

    def expert_param_bytes(self) -> tuple[int, float]:
        """(bytes of expert weights, fraction of them one token reads); (0, 0) if dense."""
        return 0, 0.0
