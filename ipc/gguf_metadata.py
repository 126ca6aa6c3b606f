"""GGUF metadata (llama.cpp's format) read as if it were a Hugging Face folder's files.

Two things come out of a .gguf file's metadata, through the `gguf` package's GGUFReader:
- a config.json-like dict built from the `{arch}.*` metadata (`gguf_config`);
- a `tokenizers.Tokenizer` built from the `tokenizer.ggml.*` metadata (`gguf_tokenizer`).
The weights are the worker's business (worker/gguf_weights.py). No torch here: the gateway
reads the tokenizer through this module, the worker the config.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ipc.model_folder import ModelLoadError

if TYPE_CHECKING:
    from gguf import GGUFReader
    from tokenizers import Tokenizer as HFTokenizer

# general.architecture -> the Hugging Face class the config names.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
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
def gguf_reader(path: str) -> GGUFReader:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot read GGUF file: {e}") from e


@functools.lru_cache(maxsize=2)
def gguf_metadata(path: str) -> dict[str, Any]:
    """All key/value metadata of a .gguf file, as Python values (strings, ints, lists)."""
    reader = gguf_reader(path)
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
    tensor_names = {t.name for t in gguf_reader(path).tensors}
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
    # Always set: without the key, a Mistral config would take transformers' default 4096
    # window (worker/model_config.py), which llama.cpp does not apply.
    window = get("attention.sliding_window")
    config["sliding_window"] = None if window is None else int(window)
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
