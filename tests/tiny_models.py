"""Tiny random Hugging Face checkpoints of every family we serve, built and saved by the
tests that need them (golden, FP8, GGUF, differential, GPU), with stories260K's tokenizer.

Seeded: the same kind and overrides give the same weights in every test.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import transformers

COMMON: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=3,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.3,  # peaked distributions, so greedy choices are not near-ties
)
# The Llama family's attention and MLP sizes (GQA: 8 query heads, 2 KV heads).
_LLAMA_SIZES = dict(intermediate_size=128, num_attention_heads=8, num_key_value_heads=2)
_NEOX = dict(num_attention_heads=4, intermediate_size=128, rotary_pct=0.25)
_MIXTRAL = dict(
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=96,
    num_local_experts=4,
    num_experts_per_tok=2,
)

# name -> (config class, model class, config kwargs): Llama, Mistral and Qwen2
LLAMA_LAYOUTS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        _LLAMA_SIZES | dict(tie_word_embeddings=False, head_dim=8),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        _LLAMA_SIZES | dict(sliding_window=None, head_dim=8),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        _LLAMA_SIZES | dict(tie_word_embeddings=True, use_sliding_window=False),
    ),
}
# ... and the families on the LayerNorm decoder or experts (tests/test_golden_models.py).
LAYOUTS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "falcon-7b-style": (
        transformers.FalconConfig,
        transformers.FalconForCausalLM,
        dict(num_attention_heads=8, multi_query=True, parallel_attn=True, bias=False),
    ),
    "falcon-new-arch": (
        transformers.FalconConfig,
        transformers.FalconForCausalLM,
        dict(
            num_attention_heads=8,
            num_kv_heads=2,
            new_decoder_architecture=True,
            bias=True,
            tie_word_embeddings=False,
        ),
    ),
    "falcon-sequential": (
        transformers.FalconConfig,
        transformers.FalconForCausalLM,
        dict(num_attention_heads=4, multi_query=False, parallel_attn=False, bias=True),
    ),
    "gpt-neox-parallel": (
        transformers.GPTNeoXConfig,
        transformers.GPTNeoXForCausalLM,
        _NEOX | dict(use_parallel_residual=True),
    ),
    "gpt-neox-sequential": (
        transformers.GPTNeoXConfig,
        transformers.GPTNeoXForCausalLM,
        _NEOX | dict(use_parallel_residual=False),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        _MIXTRAL | dict(sliding_window=None),
    ),
    "mixtral-sliding-window": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        # shorter than most prompts: the window changes the outputs
        _MIXTRAL | dict(sliding_window=8),
    ),
}


def make_tiny_model(
    kind: str,
    path: Path,
    tokenizer_src: Path,
    save_dtype: torch.dtype | None = None,
    **overrides: Any,
) -> Path:
    """A tiny random `kind` model (LLAMA_LAYOUTS or LAYOUTS) saved at `path` with the
    tokenizer of `tokenizer_src`; `overrides` replace config fields. `save_dtype`: the
    checkpoint's weights (and config dtype) in that type, as 16-bit hub checkpoints are."""
    layouts = LLAMA_LAYOUTS | LAYOUTS
    if kind not in layouts:
        raise ValueError(kind)
    cfg_cls, model_cls, kwargs = layouts[kind]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**COMMON, **kwargs, **overrides})).float().eval()
    with torch.no_grad():
        if kind == "qwen2":  # make the q/k/v biases matter
            for layer in model.model.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.bias.normal_(0, 0.3)
        elif kind in LAYOUTS:  # biases and LayerNorm affines start at 0 / 1: make them matter
            for name, p in model.named_parameters():
                if name.endswith("bias") or "layernorm" in name or "ln_" in name:
                    p.add_(torch.randn_like(p) * 0.2)
        else:  # Llama's attention_bias / mlp_bias start at 0 too (nothing drawn without)
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.3)
    if save_dtype is not None:
        model = model.to(save_dtype)
    return save_with_tokenizer(model, path, tokenizer_src)


def tiny_model_hd64(tmp_path: Path, tokenizer_src: Path) -> Path:
    """A random Llama with head_dim 64 at tmp_path / "hd64", so the CUDA kernels (not the
    torch fallback) run."""
    return make_tiny_model(
        "llama",
        tmp_path / "hd64",
        tokenizer_src,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=64,
        max_position_embeddings=512,
        initializer_range=0.2,
    )


def save_with_tokenizer(model: Any, path: Path, tokenizer_src: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / f, path / f)
    return path


def tiny_gqa_model(tmp_path: Path, tokenizer_src: Path) -> Path:
    """tiny_model_hd64 with one KV head (GQA group 4: a 128-row prefill tile holds 32
    tokens) at tmp_path / "gqa"."""
    return make_tiny_model(
        "llama",
        tmp_path / "gqa",
        tokenizer_src,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        initializer_range=0.2,
    )
