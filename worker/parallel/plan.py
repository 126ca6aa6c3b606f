"""Which slice of every weight a tensor-parallel rank holds (pure Python, no torch).

Megatron-style split of a Llama-family decoder over N ranks; each rank runs the whole
layer stack on its share and the group sums partial results twice per layer:

    x [T, H] (same on every rank)
      qkv_proj   column-parallel: rank r holds Hq/N query heads, its KV heads' rows
      attention  on the rank's heads only (its own KV cache: Hkv/N heads, or 1)
      o_proj     row-parallel: the columns of its query heads -> partial [T, H]; all-reduce
      gate_up    column-parallel: I/N rows of gate and of up
      down_proj  row-parallel: the matching I/N columns -> partial [T, H]; all-reduce
    embed_tokens vocab-parallel: rows [r*V/N, (r+1)*V/N); masked lookup, all-reduce
    lm_head      vocab-parallel: logits of those rows; all-gather -> [T, V]

KV heads: with Hkv >= N each rank holds Hkv/N of them; with fewer (Hkv < N, N a multiple
of Hkv) each KV head is replicated on N/Hkv ranks, the ones whose query heads use it:

    Hq = 8, Hkv = 2, N = 4:  rank  0   1   2   3
                        q heads    0-1 2-3 4-5 6-7
                        KV head    0   0   1   1

The vocabulary is padded up to a multiple of N; padding rows are zero and their logits are
cut off after the gather, so N need not divide the vocabulary size.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from worker.model_config import ModelConfig

# Families whose layers worker/parallel/layers.py knows how to split.
TP_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "MixtralForCausalLM",  # experts split like the MLP: each holds I/N of its rows
)


def check_tensor_parallel(config: ModelConfig, size: int, source: str = "config.json") -> None:
    """ValueError naming the field when `size` ranks cannot split this model."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    if config.architecture not in TP_ARCHITECTURES:
        raise ValueError(
            f"tensor_parallel_size {size}: {config.architecture} ({source}) cannot be split "
            f"yet; tensor parallelism supports {', '.join(TP_ARCHITECTURES)}"
        )
    hq, hkv = config.num_heads, config.num_kv_heads
    if hq % size:
        raise ValueError(
            f"tensor_parallel_size {size} must divide num_attention_heads ({hq}, {source})"
        )
    if hkv % size and size % hkv:
        raise ValueError(
            f"tensor_parallel_size {size} and num_key_value_heads ({hkv}, {source}) must "
            "divide one another (KV heads are split, or replicated when fewer than ranks)"
        )
    if config.intermediate_size % size:
        raise ValueError(
            f"tensor_parallel_size {size} must divide intermediate_size "
            f"({config.intermediate_size}, {source})"
        )


# 4-bit checkpoints pack several input rows per stored element, in per-group blocks:
# slicing them per rank is not written yet.
UNSPLIT_QUANT_METHODS = ("awq", "gptq", "marlin", "gptq_marlin", "awq_marlin")


def check_checkpoint_splits(
    hf_config: dict, quantization: str | None, size: int, source: str = "config.json"
) -> None:
    """ValueError when the checkpoint's (or --quantization's) weights cannot be split.
    source: the model folder, where an older 4-bit checkpoint keeps its settings in a side
    file (worker/quant/scheme.side_quant_config)."""
    qc = hf_config.get("quantization_config")
    if qc is None and os.path.isdir(source):
        from worker.quant.scheme import side_quant_config

        side = side_quant_config(source, quantization)
        qc = side[1] if side is not None else None
    method = str((qc if isinstance(qc, dict) else {}).get("quant_method", "")).lower()
    method = quantization if quantization in UNSPLIT_QUANT_METHODS else method
    if size > 1 and method in UNSPLIT_QUANT_METHODS:
        raise ValueError(
            f"tensor_parallel_size {size}: {method} checkpoints ({source}) cannot be split "
            "yet; use tensor_parallel_size 1, or a 16-bit / FP8 checkpoint"
        )


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `size`: the ranges of heads, MLP rows and vocabulary rows it holds."""

    rank: int
    size: int
    q_heads: tuple[int, int]  # [first, end) query heads
    kv_heads: tuple[int, int]  # [first, end) KV heads (one replicated head when Hkv < size)
    inter: tuple[int, int]  # [first, end) rows of gate and of up (columns of down)
    vocab: tuple[int, int]  # [first, end) of the padded vocabulary
    vocab_size: int  # the real vocabulary (rows past it are padding)
    head_dim: int

    @classmethod
    def make(cls, config: ModelConfig, rank: int, size: int) -> ShardPlan:
        check_tensor_parallel(config, size)
        if not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, {size}), got {rank}")
        hq, hkv, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
        nq, ni = hq // size, inter // size
        if hkv >= size:
            nkv = hkv // size
            kv0 = rank * nkv
        else:  # replicated: the one KV head this rank's query heads read
            nkv, kv0 = 1, rank * hkv // size
        per = -(-config.vocab_size // size)
        return cls(
            rank=rank,
            size=size,
            q_heads=(rank * nq, (rank + 1) * nq),
            kv_heads=(kv0, kv0 + nkv),
            inter=(rank * ni, (rank + 1) * ni),
            vocab=(rank * per, (rank + 1) * per),
            vocab_size=config.vocab_size,
            head_dim=config.head_dim,
        )

    @property
    def vocab_per_rank(self) -> int:
        return self.vocab[1] - self.vocab[0]

    def rank_config(self, config: ModelConfig) -> ModelConfig:
        """The config this rank's layers are built from: its heads and MLP rows (the
        vocabulary stays whole; worker/parallel/layers.py splits embedding and head)."""
        return dataclasses.replace(
            config,
            num_heads=self.q_heads[1] - self.q_heads[0],
            num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
            intermediate_size=self.inter[1] - self.inter[0],
        )
