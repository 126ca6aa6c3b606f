"""Mixtral as llama.cpp writes it: a "llama" GGUF with expert_count, the router as
ffn_gate_inp and each projection's experts stacked in one tensor (ffn_*_exps), q/k rows
permuted. Read back, it must be the Hugging Face checkpoint's model: same weights, same
greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ipc.gguf_metadata import gguf_config
from tests.gguf_files import add_hf_tensor, finish, llama_writer
from tests.test_golden import prompts_of_different_lengths, run_headrace
from tests.tiny_models import make_tiny_model
from worker.gguf_weights import iter_gguf_weights
from worker.model_config import ModelConfig

STACKED = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def write_mixtral_gguf(hf_path: Path, tokenizer_src: Path, out: Path) -> Path:
    config = json.loads((hf_path / "config.json").read_text())
    tensors = load_file(str(hf_path / "model.safetensors"))
    w = llama_writer(out, config, tokenizer_src)
    w.add_key_length(config["head_dim"])
    w.add_expert_count(config["num_local_experts"])
    w.add_expert_used_count(config["num_experts_per_tok"])
    experts = config["num_local_experts"]
    for i in range(config["num_hidden_layers"]):
        moe = f"model.layers.{i}.block_sparse_moe"
        for hf, stacked in STACKED.items():
            t = torch.stack([tensors.pop(f"{moe}.experts.{e}.{hf}.weight") for e in range(experts)])
            w.add_tensor(f"blk.{i}.{stacked}.weight", t.numpy())  # [E, out, in]
    for name, t in tensors.items():
        add_hf_tensor(w, name, t, config)
    finish(w)
    return out


def test_mixtral_gguf_equals_safetensors(tmp_path: Path, stories_path: Path) -> None:
    hf = make_tiny_model("mixtral", tmp_path / "hf", stories_path)
    path = write_mixtral_gguf(hf, stories_path, tmp_path / "mixtral.gguf")
    config = gguf_config(str(path))
    mc = ModelConfig.from_hf(config)
    assert (mc.architecture, mc.num_experts, mc.num_experts_per_tok) == ("MixtralForCausalLM", 4, 2)
    expected = load_file(str(hf / "model.safetensors"))
    got = dict(iter_gguf_weights(str(path)))
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    prompts = prompts_of_different_lengths(4)
    ours, _ = run_headrace(path, prompts, device="cpu", block_size=4)
    theirs, _ = run_headrace(hf, prompts, device="cpu", block_size=4)
    assert [t for t, _ in ours] == [t for t, _ in theirs]
