"""GGUF weights under Hugging Face names, dequantized to float32 one tensor at a time
(`iter_gguf_weights`), with llama.cpp's rotary row permutation of q/k undone. Mixtral is a
"llama" file with `expert_count`; its stacked expert tensors are split per expert.

GGUF stores a 2-D weight with its dimensions fastest-first (`ne = [in, out]`); its data is
row-major `[out, in]`, the torch layout, so the shape is the metadata shape reversed.
The config and tokenizer come from the metadata (ipc/gguf_metadata.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ipc.gguf_metadata import gguf_config, gguf_reader
from ipc.model_folder import ModelLoadError

if TYPE_CHECKING:
    import numpy as np
    import torch

# convert_hf_to_gguf.py permutes q_proj/k_proj rows of these so llama.cpp's rotary can pair
# adjacent elements; Hugging Face pairs element i with i + head_dim/2 (rotate_half).
PERMUTED_QK_ARCHITECTURES = {"llama", "mistral", "mixtral"}
# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate_inp": "block_sparse_moe.gate",  # Mixtral's router
}
# Mixtral's experts, stacked in one [E, out, in] tensor per projection -> per-expert names.
EXPERT_TENSORS = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors llama.cpp keeps for its own kernels that have no Hugging Face counterpart.
SKIPPED_TENSORS = {"rope_freqs.weight"}
# ---------------------------------------------------------------------------- weights


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor ("blk.3.attn_q.weight" ->
    "model.layers.3.self_attn.q_proj.weight"); None for tensors with no counterpart."""
    if gguf_name in SKIPPED_TENSORS:
        return None
    base, _, suffix = gguf_name.rpartition(".")
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        layer, part = m.groups()
        if part in LAYER_TENSORS:
            return f"model.layers.{layer}.{LAYER_TENSORS[part]}.{suffix}"
    elif base in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[base]}.{suffix}"
    return None


def _expert_tensor(gguf_name: str) -> str | None:
    """ "blk.3.ffn_gate_exps.weight" -> "model.layers.3.block_sparse_moe.experts.{}.w1.weight"
    (a format string over the expert index); None for other tensors."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name):
        layer, part = m.groups()
        if part in EXPERT_TENSORS:
            return (
                f"model.layers.{layer}.block_sparse_moe.experts.{{}}.{EXPERT_TENSORS[part]}.weight"
            )
    return None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert convert_hf_to_gguf's `permute` of q_proj/k_proj rows (weight or bias).

    Per head, llama.cpp's rows are ordered (pair, 2): rows 2i and 2i+1 rotate together.
    Hugging Face's are ordered (2, pair): row i rotates with row i + head_dim/2.
    """
    rows = w.shape[0]
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf's permutation (the inverse of `unpermute_qk`); used by tests."""
    rows = w.shape[0]
    return (
        w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def iter_gguf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, float32 CPU tensor) for every weight, one at a time."""
    import torch

    config = gguf_config(path)
    permute = config["model_type"] in PERMUTED_QK_ARCHITECTURES
    for t in gguf_reader(path).tensors:
        if experts := _expert_tensor(t.name):
            stacked = torch.from_numpy(_dequantize(path, t))  # [E, out, in]
            for e in range(stacked.shape[0]):
                yield experts.format(e), stacked[e].contiguous()
            continue
        name = hf_tensor_name(t.name)
        if name is None:
            if t.name in SKIPPED_TENSORS:
                continue
            raise ModelLoadError(f"{path}: unknown GGUF tensor {t.name!r}")
        array = _dequantize(path, t)
        tensor = torch.from_numpy(array)
        if permute and ".self_attn.q_proj." in name:
            tensor = unpermute_qk(tensor, config["num_attention_heads"])
        elif permute and ".self_attn.k_proj." in name:
            tensor = unpermute_qk(tensor, config["num_key_value_heads"])
        yield name, tensor.contiguous()


def _dequantize(path: str, t: Any) -> np.ndarray:
    """One tensor's data as a float32 array of the torch shape (GGUF's shape reversed)."""
    import numpy as np
    from gguf import quants

    try:
        array = quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError) as e:
        raise ModelLoadError(
            f"{path}: tensor {t.name!r} has quantization {t.tensor_type.name}, "
            f"which the gguf package cannot dequantize: {e}"
        ) from e
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    # np.array copies: F32 data would otherwise be a read-only view of the memory map.
    return np.array(array, dtype=np.float32).reshape(shape)
