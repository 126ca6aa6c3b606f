"""GGUF checkpoints (llama.cpp's format) read as if they were Hugging Face folders.

Three things come out of one .gguf file, through the `gguf` package's GGUFReader:
- a config.json-like dict built from the `{arch}.*` metadata (`gguf_config`);
- the weights under Hugging Face names, dequantized to float32 one tensor at a time
  (`iter_gguf_weights`), with llama.cpp's rotary row permutation of q/k undone (Mixtral:
  a "llama" file with `expert_count`, its stacked expert tensors split per expert);
- a `tokenizers.Tokenizer` built from the `tokenizer.ggml.*` metadata (`gguf_tokenizer`).

GGUF stores a 2-D weight with its dimensions fastest-first (`ne = [in, out]`); its data is
row-major `[out, in]`, the torch layout, so the shape is the metadata shape reversed.

torch and tokenizers are imported inside the functions that need them: the gateway reads
the tokenizer without torch, the worker reads weights without tokenizers.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.model_files import ModelLoadError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import GGUFReader
    from tokenizers import Tokenizer as HFTokenizer

# general.architecture -> the Hugging Face class the config names.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

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

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1,
    2,
    3,
    4,
    5,
    6,
)


# ---------------------------------------------------------------------------- metadata


@functools.lru_cache(maxsize=2)
def _reader(path: str) -> GGUFReader:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot read GGUF file: {e}") from e


@functools.lru_cache(maxsize=2)
def gguf_metadata(path: str) -> dict[str, Any]:
    """All key/value metadata of a .gguf file, as Python values (strings, ints, lists)."""
    reader = _reader(path)
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path}: unreadable GGUF metadata {key!r}: {e}") from e
    return meta


def gguf_config(path: str) -> dict[str, Any]:
    """A Hugging Face config.json-like dict built from the GGUF metadata."""
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if required and value is None:
            raise ModelLoadError(f"{path}: GGUF metadata {arch}.{key} missing")
        return value

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    kv_heads = get("attention.head_count_kv", heads)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if tokens else get("vocab_size", required=True)
    tensor_names = {t.name for t in _reader(path).tensors}
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(vocab_size),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "torch_dtype": "float32",
    }
    if get("expert_count"):  # llama.cpp stores Mixtral as "llama" with experts
        config["architectures"] = ["MixtralForCausalLM"]
        config["model_type"] = "mixtral"
        config["num_local_experts"] = int(get("expert_count"))
        config["num_experts_per_tok"] = int(get("expert_used_count", required=True))
    if get("attention.sliding_window") is not None:
        config["sliding_window"] = int(get("attention.sliding_window"))
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {
            "rope_type": scaling,
            "factor": float(get("rope.scaling.factor", 1.0)),
        }
        if get("rope.scaling.original_context_length") is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = int(
                get("rope.scaling.original_context_length")
            )
    for key, name in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("padding", "pad_token_id"),
    ):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[name] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    return config


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
    for t in _reader(path).tensors:
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


# ---------------------------------------------------------------------------- tokenizer


@dataclass
class GGUFTokenizerInfo:
    """A tokenizer built from GGUF metadata, with what tokenizer_config.json would say."""

    tokenizer: HFTokenizer
    bos_token_id: int | None
    eos_token_id: int | None  # tokenizer.ggml.eos_token_id
    eos_token_ids: set[int]  # with the end-of-turn token, where the file names one
    add_bos_token: bool
    chat_template: str | None


# Pre-tokenizer regexes by `tokenizer.ggml.pre` (llama.cpp's llama_vocab::impl::load).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
# StarCoder-family vocabularies (SmolLM included) split digits one by one, then GPT-2 rules.
DIGIT_SPLITTING_PRE = {"smollm", "starcoder", "refact", "codeshell"}


def gguf_tokenizer(path: str) -> GGUFTokenizerInfo:
    """Build the tokenizer a .gguf file describes ("gpt2" byte-level BPE or "llama" SPM)."""
    meta = gguf_metadata(path)
    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{path}: GGUF file has no tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if model == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens)
        default_add_bos = False
    elif model == "llama":
        tokenizer = _sentencepiece_bpe(path, meta, tokens, types)
        default_add_bos = True
    else:
        raise ModelLoadError(
            f"{path}: GGUF tokenizer model {model!r} is not supported (gpt2 and llama are)"
        )
    _add_special_tokens(tokenizer, tokens, types)

    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos))
    if add_bos and bos is not None:
        from tokenizers import processors

        bos_token = tokens[int(bos)]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token}:0 $A:0",
            pair=f"{bos_token}:0 $A:0 {bos_token}:0 $B:0",
            special_tokens=[(bos_token, int(bos))],
        )
    eos_ids = {
        int(meta[key])
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if key in meta
    }
    return GGUFTokenizerInfo(
        tokenizer=tokenizer,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_id=_opt_int(meta.get("tokenizer.ggml.eos_token_id")),
        eos_token_ids=eos_ids,
        add_bos_token=add_bos and bos is not None,
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _opt_int(value: Any) -> int | None:
    return int(value) if value is not None else None


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str]) -> HFTokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))  # type: ignore[arg-type]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe", "qwen2"):
        regex = QWEN2_REGEX if pre == "qwen2" else LLAMA3_REGEX
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in DIGIT_SPLITTING_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(
    path: str, meta: dict[str, Any], tokens: list[str], types: list[int]
) -> HFTokenizer:
    """SentencePiece BPE: merges ranked by the merged piece's score, byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores: list[float] = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        # Every split of a piece into two pieces is a merge, ranked by the piece's score
        # (higher first), as transformers' SentencePieceExtractor does.
        ranked: list[tuple[float, int, int, str, str]] = []
        for piece, i in vocab.items():
            if types[i] != TOKEN_NORMAL:
                continue
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in vocab and right in vocab:
                    ranked.append((-scores[i], vocab[left], vocab[right], left, right))
        ranked.sort()
        merge_pairs = [(left, right) for _, _, _, left, right in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merge_pairs,  # type: ignore[arg-type]
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    steps: list[Any] = []
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode_steps: list[Any] = [
        decoders.Replace("▁", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    return tokenizer


def _add_special_tokens(tokenizer: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so
    that both are matched whole in text and never split by the model."""
    from tokenizers import AddedToken

    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(types)
        if kind == TOKEN_CONTROL or (kind == TOKEN_UNKNOWN and tokens[i].startswith("<"))
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, kind in enumerate(types)
        if kind == TOKEN_USER_DEFINED
    ]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)
