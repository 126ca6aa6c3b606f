"""Mixtral as llama.cpp writes it: a "llama" GGUF with expert_count, the router as
ffn_gate_inp and each projection's experts stacked in one tensor (ffn_*_exps), q/k rows
permuted. Read back, it must be the Hugging Face checkpoint's model: same weights, same
greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import torch
from safetensors.torch import load_file

from ipc.gguf_metadata import gguf_config
from tests.test_gguf import _gguf_name, _spm_vocab
from tests.test_golden import prompts_of_different_lengths, run_headrace
from tests.tiny_models import make_tiny_model
from worker.gguf_weights import iter_gguf_weights, permute_qk
from worker.model_config import ModelConfig

STACKED = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def write_mixtral_gguf(hf_path: Path, tokenizer_src: Path, out: Path) -> Path:
    config = json.loads((hf_path / "config.json").read_text())
    tensors = load_file(str(hf_path / "model.safetensors"))
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    w.add_expert_count(config["num_local_experts"])
    w.add_expert_used_count(config["num_experts_per_tok"])
    tokens, scores, types = _spm_vocab(json.loads((tokenizer_src / "tokenizer.json").read_text()))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    experts = config["num_local_experts"]
    for i in range(config["num_hidden_layers"]):
        moe = f"model.layers.{i}.block_sparse_moe"
        for hf, stacked in STACKED.items():
            t = torch.stack([tensors.pop(f"{moe}.experts.{e}.{hf}.weight") for e in range(experts)])
            w.add_tensor(f"blk.{i}.{stacked}.weight", t.numpy())  # [E, out, in]
    for name, t in tensors.items():
        if name.endswith("q_proj.weight"):
            t = permute_qk(t, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            t = permute_qk(t, config["num_key_value_heads"])
        w.add_tensor(_gguf_name(name), t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
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
