"""Golden tests, config option by config option: for each variant of each family we serve,
a tiny random transformers model with that config (saved to tmp_path) against headrace
on the CPU in fp32: greedy tokens and their logprobs (test_golden.py's engine settings:
block_size 4, chunked prefill, few KV blocks; its tolerance).

Every variant also says what its config must parse to (`expect`), so an option that
transformers drops on the way to config.json cannot pass unnoticed.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_golden import (
    ENGINE_ARGS,
    check_logprobs_close,
    hf_greedy,
    prompts_of_different_lengths,
    run_headrace,
)
from tests.test_prefix_caching import shared_prefix_prompts
from tests.tiny_models import make_tiny_model
from worker.model_config import ModelConfig

pytestmark = pytest.mark.golden

LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    # head_dim 8 has wavelengths 6, 63, 628 and 6283: one high, one blended, two scaled
    original_max_position_embeddings=64,
)
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)


def variant(
    kind: str, expect: dict[str, Any], dtype: torch.dtype | None = None, **overrides: Any
) -> tuple[str, dict[str, Any], torch.dtype | None, dict[str, Any]]:
    return kind, overrides, dtype, expect


def make_variant(name: str, path: Path, stories_path: Path) -> Path:
    kind, overrides, dtype, _ = VARIANTS[name]
    # transformers completes rope dicts in place: each model gets its own copy
    return make_tiny_model(kind, path, stories_path, dtype, **copy.deepcopy(overrides))


def _rope(kind: str) -> Any:
    return lambda s: s is not None and s["rope_type"] == kind


# name -> (tiny_models kind, config overrides, checkpoint dtype, {ModelConfig field: value
# or a predicate})
VARIANTS = {
    # ---- Llama 2 / 3 / 3.1 / 3.2 --------------------------------------------------------
    "llama3.1-rope": variant("llama", {"rope_scaling": _rope("llama3")}, rope_scaling=LLAMA3_ROPE),
    "llama3.2-tied": variant(
        "llama",
        {"tie_word_embeddings": True, "rope_theta": 500000.0, "rope_scaling": _rope("llama3")},
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE,
    ),
    "llama-linear-rope": variant(
        "llama",
        {"rope_scaling": _rope("linear"), "max_context": 64},
        # positions run past max_position_embeddings: the factor extends the context
        max_position_embeddings=32,
        rope_scaling=dict(rope_type="linear", factor=2.0),
    ),
    "llama-yarn": variant("llama", {"rope_scaling": _rope("yarn")}, rope_scaling=YARN),
    "llama-yarn-mscale": variant(
        "llama",
        {"rope_scaling": _rope("yarn")},
        rope_scaling=YARN | dict(mscale=1.0, mscale_all_dim=0.5, beta_fast=8, beta_slow=2),
    ),
    "llama-yarn-attention-factor": variant(
        "llama",
        {"rope_scaling": _rope("yarn")},
        rope_scaling=YARN | dict(attention_factor=1.5, truncate=False),
    ),
    "llama-head-dim-16": variant("llama", {"head_dim": 16}, head_dim=16),
    "llama-biases": variant(
        "llama",
        {"attention_bias": True, "o_proj_bias": True, "mlp_bias": True},
        attention_bias=True,
        mlp_bias=True,
    ),
    # large enough to change the logits (1e-5 against 1e-6 would not, at fp32 tolerance)
    "llama-rms-norm-eps": variant("llama", {"rms_norm_eps": 0.1}, rms_norm_eps=0.1),
    "llama-bf16-checkpoint": variant("llama", {"torch_dtype": "bfloat16"}, torch.bfloat16),
    # ---- Mistral ----------------------------------------------------------------------------
    "mistral-nemo-head-dim": variant(
        "mistral",
        {"head_dim": 16, "rope_theta": 1e6, "sliding_window": None},
        head_dim=16,
        rope_theta=1e6,
    ),
    "mistral-window-4-fp16": variant(
        "mistral", {"sliding_window": 4, "torch_dtype": "float16"}, torch.float16, sliding_window=4
    ),
    # ---- Qwen2 ------------------------------------------------------------------------------
    "qwen2-0.5b-style": variant(
        "qwen2",
        {"tie_word_embeddings": True, "rope_theta": 1e6, "attention_bias": True},
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "qwen2-window-untied": variant(
        "qwen2",
        {"sliding_window": 5, "layer_types": lambda t: t.count("sliding_attention") == 2},
        use_sliding_window=True,
        sliding_window=5,
        max_window_layers=1,
        tie_word_embeddings=False,
        rope_theta=1e6,
    ),
    "qwen2.5-yarn-bf16": variant(
        "qwen2", {"rope_scaling": _rope("yarn")}, torch.bfloat16, rope_scaling=YARN
    ),
    # ---- Mixtral ----------------------------------------------------------------------------
    "mixtral-top1-of-4": variant(
        "mixtral", {"num_experts_per_tok": 1, "num_experts": 4}, num_experts_per_tok=1
    ),
    "mixtral-top2-of-8": variant(
        "mixtral", {"num_experts_per_tok": 2, "num_experts": 8}, num_local_experts=8
    ),
    "mixtral-top1-of-8-window": variant(
        "mixtral",
        {"num_experts_per_tok": 1, "num_experts": 8, "sliding_window": 6},
        num_local_experts=8,
        num_experts_per_tok=1,
        sliding_window=6,
        router_jitter_noise=0.0,
    ),
    # ---- Falcon -----------------------------------------------------------------------------
    "falcon-mha-parallel": variant(
        "falcon-7b-style",
        {"qkv_layout": "per_head", "shared_norm": True, "num_kv_heads": 4},
        multi_query=False,
        num_attention_heads=4,
    ),
    "falcon-7b-bias": variant(
        "falcon-7b-style", {"qkv_layout": "q_k_v", "attention_bias": True}, bias=True
    ),
    "falcon-mq-sequential": variant(
        "falcon-sequential",
        {"qkv_layout": "q_k_v", "parallel_attn": False, "num_kv_heads": 1},
        multi_query=True,
        num_attention_heads=8,
    ),
    "falcon2-one-norm": variant(  # Falcon2-11B: new architecture, one shared LayerNorm
        "falcon-new-arch",
        {"shared_norm": True, "intermediate_size": 96, "rope_theta": 500042.0},
        num_ln_in_parallel_attn=1,
        ffn_hidden_size=96,
        rope_theta=500042.0,
    ),
    "falcon-new-arch-one-kv-head": variant(
        "falcon-new-arch", {"num_kv_heads": 1, "qkv_layout": "per_kv_group"}, num_kv_heads=1
    ),
    "falcon-new-arch-kv-eq-heads": variant(
        "falcon-new-arch", {"num_kv_heads": 8, "qkv_layout": "per_kv_group"}, num_kv_heads=8
    ),
    # ---- GPT-NeoX / Pythia ------------------------------------------------------------------
    "neox-full-rotary-base-500": variant(
        "gpt-neox-parallel",
        {"rotary_dim": 16, "rope_theta": 500.0},
        rotary_pct=1.0,
        rotary_emb_base=500,
    ),
    "neox-5-heads-sequential": variant(
        "gpt-neox-sequential",
        {"num_heads": 5, "head_dim": 16, "rotary_dim": 4},
        hidden_size=80,
        num_attention_heads=5,
    ),
    "pythia-2.8b-head-dim-80": variant(  # rotary dims 20: not a multiple of 8
        "gpt-neox-parallel",
        {"head_dim": 80, "rotary_dim": 20},
        hidden_size=160,
        num_attention_heads=2,
    ),
    "neox-20b-gelu-fast-no-attention-bias": variant(
        "gpt-neox-parallel",
        {"hidden_act": "gelu_fast", "attention_bias": False},
        hidden_act="gelu_fast",
        attention_bias=False,
    ),
    "neox-tied-fp16": variant(
        "gpt-neox-sequential",
        {"tie_word_embeddings": True},
        torch.float16,
        tie_word_embeddings=True,
    ),
}
PROMPTS = prompts_of_different_lengths()[::2]  # 1 to 32 tokens, 12 more generated


def check_expected(path: Path, name: str, expect: dict[str, Any]) -> None:
    mc = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    for key, want in expect.items():
        got = getattr(mc, key)
        ok = want(got) if callable(want) else got == want
        assert ok, f"{name}: config.json parses to {key} = {got!r}, the variant wants {want!r}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_transformers(name, tmp_path, stories_path):
    path = make_variant(name, tmp_path / "m", stories_path)
    check_expected(path, name, VARIANTS[name][3])
    ours, _ = run_headrace(path, PROMPTS, **ENGINE_ARGS)
    check_logprobs_close(ours, hf_greedy(path, PROMPTS), name)


@pytest.mark.parametrize(
    "name", ["mistral-window-4-fp16", "qwen2-window-untied", "llama-yarn", "falcon2-one-norm"]
)
def test_prefix_caching_variant_matches_transformers(name, tmp_path, stories_path):
    """Prompts sharing 8- and 22-token prefixes, so later requests start from cached
    blocks: with a window, from blocks partly outside it."""
    path = make_variant(name, tmp_path / "m", stories_path)
    prompts = shared_prefix_prompts()[:7]
    ours, engine = run_headrace(path, prompts, **(ENGINE_ARGS | dict(num_gpu_blocks=40)))
    assert engine.kv.prefix_hits > 0, "the test meant to hit the prefix cache"
    check_logprobs_close(ours, hf_greedy(path, prompts), name)


def test_dynamic_ntk_rope_is_vllms_fixed_base(tmp_path, stories_path):
    """rope_scaling dynamic runs vLLM's dynamic NTK: the base fixed once for the longest
    context, theta (f^2 - f + 1)^(R/(R-2)) (transformers instead grows it with the
    current length past max_position_embeddings, which a KV cache cannot follow). So the
    reference is transformers with plain rope at that base, on the same weights."""
    factor, theta, rotary = 2.0, 10000.0, 8
    rope = dict(rope_type="dynamic", factor=factor)
    path = make_tiny_model("llama", tmp_path / "dyn", stories_path, rope_scaling=rope)
    check_expected(path, "dynamic", {"rope_scaling": _rope("dynamic"), "max_context": 512})
    ref = tmp_path / "ref"
    shutil.copytree(path, ref)
    cfg = json.loads((ref / "config.json").read_text())
    base = theta * (factor * factor - factor + 1) ** (rotary / (rotary - 2))
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": base}
    (ref / "config.json").write_text(json.dumps(cfg))
    ours, _ = run_headrace(path, PROMPTS, **ENGINE_ARGS)
    check_logprobs_close(ours, hf_greedy(ref, PROMPTS), "dynamic")
