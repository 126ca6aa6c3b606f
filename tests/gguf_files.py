"""Writing Hugging Face checkpoints out as llama.cpp GGUF files, the way its
convert_hf_to_gguf.py does (q/k rows permuted, SentencePiece scores), for the GGUF tests
(tests/test_gguf.py: stories260K, tests/test_gguf_mixtral.py: a tiny Mixtral)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import torch

from worker.gguf_weights import LAYER_TENSORS, permute_qk


def llama_writer(out: Path, config: dict[str, Any], tokenizer_src: Path) -> gguf.GGUFWriter:
    """A "llama" GGUF writer holding config's shapes and tokenizer_src's vocabulary (bos 1,
    eos 2); the caller adds what its model needs more, then its tensors, then `finish`."""
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    tokens, scores, types = spm_vocab(json.loads((tokenizer_src / "tokenizer.json").read_text()))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    return w


def add_hf_tensor(
    w: gguf.GGUFWriter,
    name: str,
    t: torch.Tensor,
    config: dict[str, Any],
    quant: gguf.GGMLQuantizationType | None = None,
) -> None:
    """Checkpoint tensor `name` under its GGUF name, q/k rows permuted as llama.cpp stores
    them; `quant`: stored quantized (e.g. Q8_0)."""
    if name.endswith("q_proj.weight"):
        t = permute_qk(t, config["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
        t = permute_qk(t, config["num_key_value_heads"])
    if quant is None:
        w.add_tensor(gguf_name(name), t.numpy())
    else:
        w.add_tensor(gguf_name(name), gguf.quants.quantize(t.numpy(), quant), raw_dtype=quant)


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_name(hf_name: str) -> str:
    inverse = {v: k for k, v in LAYER_TENSORS.items()}
    base, _, suffix = hf_name.rpartition(".")
    if base == "model.embed_tokens":
        return f"token_embd.{suffix}"
    if base == "model.norm":
        return f"output_norm.{suffix}"
    if base == "lm_head":
        return f"output.{suffix}"
    _, _, layer, part = base.split(".", 3)
    return f"blk.{layer}.{inverse[part]}.{suffix}"


def spm_vocab(tokenizer_json: dict[str, Any]) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores and llama.cpp token types for a SentencePiece-BPE tokenizer.json:
    a piece's score is minus the rank of the merge that makes it, as in SentencePiece."""
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    scores = [0.0] * len(tokens)
    for rank, merge in enumerate(tokenizer_json["model"]["merges"]):
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        i = vocab[left + right]
        if scores[i] == 0.0:
            scores[i] = -float(rank + 1)
    types = []
    for tok in tokens:
        if tok == "<unk>":
            types.append(2)
        elif tok in ("<s>", "</s>"):
            types.append(3)
        elif tok.startswith("<0x") and len(tok) == 6:
            types.append(6)
        else:
            types.append(1)
    return tokens, scores, types
