"""Golden tests for Falcon, GPT-NeoX and Mixtral: greedy tokens and logprobs against
Hugging Face transformers on tiny random models built and saved here, with test_golden.py's
engine settings (block_size 4, chunked prefill, preemption) and checks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests.test_golden import (
    ENGINE_ARGS,
    check_logprobs_close,
    hf_greedy,
    prompts_of_different_lengths,
    run_headrace,
)

pytestmark = pytest.mark.golden

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=3,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.3,  # peaked distributions, so greedy choices are not near-ties
)

# name -> (config class, model class, config kwargs)
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
        dict(
            num_attention_heads=4,
            intermediate_size=128,
            rotary_pct=0.25,
            use_parallel_residual=True,
        ),
    ),
    "gpt-neox-sequential": (
        transformers.GPTNeoXConfig,
        transformers.GPTNeoXForCausalLM,
        dict(
            num_attention_heads=4,
            intermediate_size=128,
            rotary_pct=0.25,
            use_parallel_residual=False,
        ),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=96,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
        ),
    ),
    "mixtral-sliding-window": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=96,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,  # shorter than most prompts: the window changes the outputs
        ),
    ),
}


def make_tiny(kind: str, path: Path, tokenizer_src: Path, **overrides: Any) -> Path:
    """LAYOUTS[kind], saved with the tokenizer; `overrides` replace config fields."""
    cfg_cls, model_cls, kwargs = LAYOUTS[kind]
    cfg = cfg_cls(**{**COMMON, **kwargs, **overrides})
    torch.manual_seed(0)
    model = model_cls(cfg).float().eval()
    with torch.no_grad():  # biases and LayerNorm affines start at 0 / 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / f, path / f)
    return path


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_tiny_models_match_transformers(kind, tmp_path, stories_path):
    path = make_tiny(kind, tmp_path / kind, stories_path)
    prompts = prompts_of_different_lengths()
    ours, engine = run_headrace(path, prompts, **ENGINE_ARGS)
    assert engine.scheduler.num_preemptions > 0, "the test meant to force preemption"
    check_logprobs_close(ours, hf_greedy(path, prompts), kind)
