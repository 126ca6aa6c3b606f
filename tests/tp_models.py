"""Tiny random Llama-family checkpoints for the tensor-parallel tests, written directly as
safetensors (no transformers import), with stories260K's tokenizer (512 tokens)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_tiny_model(
    path: Path,
    tokenizer_src: Path,
    kind: str = "llama",
    *,
    num_kv_heads: int = 4,
    vocab_size: int = 512,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """A random `kind` ("llama", "qwen2", "mistral" or "mixtral": 4 experts, top 2) model with 8 heads of 8 dims, hidden 64."""
    hidden, heads, head_dim, inter = 64, 8, 8, 128
    qwen = kind == "qwen2"
    arch = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mistral": "MistralForCausalLM",
        "mixtral": "MixtralForCausalLM",
    }[kind]
    experts = 4 if kind == "mixtral" else 0
    config = {
        "architectures": [arch],
        "model_type": kind,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": qwen,  # Qwen2's small models tie; Llama here does not
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if experts:
        config |= {"num_local_experts": experts, "num_experts_per_tok": 2}
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    kv = num_kv_heads * head_dim
    t = {"model.embed_tokens.weight": rand(vocab_size, hidden, std=1.0)}
    t["model.norm.weight"] = 1 + rand(hidden, std=0.1)
    if not qwen:
        t["lm_head.weight"] = rand(vocab_size, hidden)
    for i in range(num_layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = 1 + rand(hidden, std=0.1)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + rand(hidden, std=0.1)
        for name, rows in (("q_proj", heads * head_dim), ("k_proj", kv), ("v_proj", kv)):
            t[f"{p}.self_attn.{name}.weight"] = rand(rows, hidden, std=hidden**-0.5)
            if qwen:
                t[f"{p}.self_attn.{name}.bias"] = rand(rows)
        t[f"{p}.self_attn.o_proj.weight"] = rand(hidden, heads * head_dim, std=hidden**-0.5)
        names = ("gate_proj", "up_proj", "down_proj")
        mlps = [f"{p}.mlp"]
        if experts:
            t[f"{p}.block_sparse_moe.gate.weight"] = rand(experts, hidden)
            names = ("w1", "w3", "w2")
            mlps = [f"{p}.block_sparse_moe.experts.{e}" for e in range(experts)]
        for m in mlps:
            t[f"{m}.{names[0]}.weight"] = rand(inter, hidden, std=hidden**-0.5)
            t[f"{m}.{names[1]}.weight"] = rand(inter, hidden, std=hidden**-0.5)
            t[f"{m}.{names[2]}.weight"] = rand(hidden, inter, std=inter**-0.5)
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / f, path / f)
    return path
