"""GGUF reading: config from metadata, tensor names, dequantization, q/k un-permutation,
and the tokenizer built from metadata.

stories260K is written out as a GGUF the way llama.cpp's convert_hf_to_gguf.py would (q/k
rows permuted, SentencePiece scores); reading it back must give the Hugging Face weights
and tokenizer exactly. SmolLM2 (a real llama.cpp GGUF) must answer a question correctly.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

from gateway.tokenizer import load_tokenizer
from ipc.gguf_metadata import gguf_config, gguf_tokenizer
from ipc.model_folder import ModelLoadError, open_model
from tests.gguf_files import add_hf_tensor, finish, llama_writer
from worker.gguf_weights import (
    hf_tensor_name,
    iter_gguf_weights,
    permute_qk,
    unpermute_qk,
)
from worker.weights import iter_weights

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "  leading spaces and trailing  ",
    "Ünïcödé: 你好, 🎉 and ∑ fall back to bytes",
    "line one\nline two\ttab",
    "",
]


@pytest.fixture(scope="module")
def stories_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K as a GGUF: F32 weights with q/k permuted as llama.cpp does, one Q8_0."""
    from conftest import STORIES

    if not (STORIES / "config.json").exists():
        pytest.skip(f"stories260K not found at {STORIES}")
    config = json.loads((STORIES / "config.json").read_text())
    path = tmp_path_factory.mktemp("gguf") / "stories260K.gguf"
    w = llama_writer(path, config, STORIES)
    w.add_rope_dimension_count(config["head_dim"])
    w.add_unk_token_id(0)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, t in load_file(str(STORIES / "model.safetensors")).items():
        if name == "model.layers.0.mlp.up_proj.weight":
            add_hf_tensor(w, name, t, config, gguf.GGMLQuantizationType.Q8_0)
        elif name != "lm_head.weight":
            add_hf_tensor(w, name, t, config)
    finish(w)
    return path


def test_tensor_names() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert hf_tensor_name("blk.3.attn_output.weight") == "model.layers.3.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert hf_tensor_name("blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert (
        hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    )
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("rope_freqs.weight") is None
    assert hf_tensor_name("blk.0.mystery.weight") is None


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(4 * 8, 3)  # 4 heads, head_dim 8
    permuted = permute_qk(w, 4)
    assert not torch.equal(permuted, w)
    # llama.cpp's layout pairs adjacent rows: HF rows i and i + 4 of head 0 become 2i, 2i+1.
    assert torch.equal(permuted[0], w[0]) and torch.equal(permuted[1], w[4])
    assert torch.equal(permuted[2], w[1]) and torch.equal(permuted[8], w[8])
    assert torch.equal(unpermute_qk(permuted, 4), w)
    bias = torch.arange(16.0)
    assert torch.equal(unpermute_qk(permute_qk(bias, 2), 2), bias)


def test_config_from_metadata(stories_gguf: Path, stories_path: Path) -> None:
    hf = json.loads((stories_path / "config.json").read_text())
    config = gguf_config(str(stories_gguf))
    assert config["architectures"] == ["LlamaForCausalLM"]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[key] == hf[key], key
    assert config["rope_theta"] == hf["rope_parameters"]["rope_theta"]
    assert config["rms_norm_eps"] == pytest.approx(hf["rms_norm_eps"])
    assert config["tie_word_embeddings"] is True  # no output.weight in the file
    assert config["attention_bias"] is False


def test_weights_round_trip(stories_gguf: Path, stories_path: Path) -> None:
    expected = load_file(str(stories_path / "model.safetensors"))
    got = dict(iter_gguf_weights(str(stories_gguf)))
    assert set(got) == set(expected) - {"lm_head.weight"}
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32 and tensor.shape == expected[name].shape, name
        if name == "model.layers.0.mlp.up_proj.weight":  # Q8_0: 8-bit per 32-block scale
            err = (tensor - expected[name]).abs().max().item()
            assert 0 < err <= expected[name].abs().max().item() / 100, name
        else:  # q/k included: the un-permutation must restore HF's row order exactly
            assert torch.equal(tensor, expected[name]), name


def test_model_files_open_gguf(stories_gguf: Path) -> None:
    files = open_model(str(stories_gguf.parent))  # a folder holding one .gguf
    assert files.format == "gguf" and files.path == str(stories_gguf)
    assert files.tokenizer_path == str(stories_gguf)
    assert files.config["num_hidden_layers"] == 5
    assert list(iter_weights(open_model(str(stories_gguf), load_format="dummy"))) == []


def test_sentencepiece_tokenizer_from_metadata(stories_gguf: Path, stories_path: Path) -> None:
    reference = HFTokenizer.from_file(str(stories_path / "tokenizer.json"))
    info = gguf_tokenizer(str(stories_gguf))
    assert info.bos_token_id == 1 and info.eos_token_ids == {2} and info.add_bos_token
    for text in TEXTS:
        ids = info.tokenizer.encode(text).ids
        assert ids == reference.encode(text).ids, text
        assert info.tokenizer.decode(ids) == reference.decode(ids)
    tok = load_tokenizer(str(stories_gguf))
    assert tok.encode("Hello")[0] == 1 and tok.encode("Hello", add_special_tokens=False)[0] != 1
    assert tok.is_special(1) and tok.is_special(2) and not tok.is_special(300)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<s>Hi"


def test_qwen2_biases_and_byte_level_tokenizer(tmp_path: Path) -> None:
    """qwen2: q/k keep their row order (NeoX rotary), biases map, gpt2 BPE from metadata."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny-qwen2.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    byte_chars = [chr(c) for c in range(33, 127)] + ["Ġ"]
    tokens = [*byte_chars, "Ġh", "Ġhi", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["Ġ h", "Ġh i"])
    w.add_eos_token_id(len(tokens) - 1)
    q = rng.standard_normal((8, 8)).astype(np.float32)
    q_bias = rng.standard_normal(8).astype(np.float32)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), 8)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", q)
    w.add_tensor("blk.0.attn_q.bias", q_bias)
    w.add_tensor("output.weight", rng.standard_normal((len(tokens), 8)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    config = gguf_config(str(path))
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["attention_bias"] is True and config["tie_word_embeddings"] is False
    assert config["vocab_size"] == len(tokens) and config["rope_theta"] == 1e6
    weights = dict(iter_gguf_weights(str(path)))
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q))
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.bias"], torch.from_numpy(q_bias))
    assert weights["lm_head.weight"].dtype == torch.float32  # F16 dequantized
    assert weights["lm_head.weight"].shape == (len(tokens), 8)

    tok = load_tokenizer(str(path))
    ids = tok.encode(" hi<|im_end|>")
    assert tok.convert_ids_to_tokens(ids) == ["Ġhi", "<|im_end|>"]
    assert (
        tok.decode(ids) == " hi" and tok.decode(ids, skip_special_tokens=False) == " hi<|im_end|>"
    )
    assert tok.eos_token_ids == {len(tokens) - 1} and tok.bos_token_id is None


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="architecture 'mamba' is not supported"):
        open_model(str(path))


def test_smollm2_config_and_shapes(smollm2_path: Path) -> None:
    files = open_model(str(smollm2_path))
    c = files.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert c["vocab_size"] == 49152 and c["tie_word_embeddings"] is True
    assert c["rope_theta"] == 1e5 and c["eos_token_id"] == 2


@pytest.mark.golden
@pytest.mark.slow
def test_smollm2_answers_with_transformers_llama(smollm2_path: Path) -> None:
    """Dequantized, un-permuted weights in transformers' own Llama answer correctly; a
    wrong q/k row order or a transposed weight would produce nonsense."""
    import transformers

    files = open_model(str(smollm2_path))
    weights = dict(iter_weights(files))
    assert len(weights) == 30 * 9 + 2
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)

    config = {k: v for k, v in files.config.items() if k != "architectures"}
    hf_config = transformers.LlamaConfig(**config)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_config)
    model.load_state_dict(weights, strict=False, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_config)  # buffers off meta
    model.eval()

    tok = load_tokenizer(str(smollm2_path))
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, len(prompt) :].tolist()).startswith("The capital of France is Paris")
