"""The gateway's tokenizer: a `tokenizers.Tokenizer` plus what the model folder says about it.

Loads from a Hugging Face folder (tokenizer.json, tokenizer_config.json, chat template in
tokenizer_config.json or chat_template.jinja) or from a .gguf file (or a folder holding
one). Encoding matches transformers' fast tokenizers: `tokenizer.json`'s post-processor
decides whether BOS is prepended. Chat prompts are tokenized without special tokens, as
transformers does, because templates emit BOS themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from gateway.chat_template import ChatTemplateError, render_chat_template
from ipc import token_bytes as tb
from ipc.model_folder import ModelLoadError, find_gguf_file, read_json

__all__ = ["ChatTemplateError", "Tokenizer", "load_tokenizer"]


class Tokenizer:
    """Text <-> token ids for one model; thread-safe for encode/decode (tokenizers is)."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        name: str,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        self._tok = tokenizer
        self.name = name
        self.bos_token_id = bos_token_id
        self.eos_token_ids: set[int] = set(eos_token_ids)
        # The EOS the chat template's `eos_token` names; eos_token_ids may hold more.
        self.eos_token_id = (
            eos_token_id if eos_token_id is not None else min(eos_token_ids, default=None)
        )
        self.chat_template = chat_template
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids: frozenset[int] = tb.special_ids(tokenizer)
        self.byte_fallback_ids = tb.byte_fallback_ids(tokenizer)
        self._byte_level = tb.is_byte_level(tokenizer)

    @property
    def bos_token(self) -> str:
        return self._token_text(self.bos_token_id)

    @property
    def eos_token(self) -> str:
        return self._token_text(self.eos_token_id)

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._tok.id_to_token(token_id) or ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode does not): a long text tokenized in a
        # thread then leaves the event loop free.
        encode = self._tok.encode if len(text) < 4096 else self._encode_unlocked
        try:
            encoding = encode(text, add_special_tokens=add_special_tokens)
        except TypeError:
            # Lone surrogates (valid in JSON "\ud800" escapes) are not UTF-8: replace them.
            text = text.encode("utf-8", "replace").decode("utf-8")
            encoding = encode(text, add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    def _encode_unlocked(self, text: str, add_special_tokens: bool = True) -> Any:
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    @property
    def raw(self) -> HFTokenizer:
        """The `tokenizers` object itself (incremental decoding steps it directly)."""
        return self._tok

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI logprobs' `bytes`); may be part of a
        UTF-8 character, which `decode([token_id])` would show as U+FFFD."""
        return tb.token_bytes(
            self._tok.id_to_token(token_id) or "",
            special=token_id in self.special_ids,
            byte_level=self._byte_level,
            byte_fallback=token_id in self.byte_fallback_ids,
        )

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`; raises ChatTemplateError if the model has none."""
        template = chat_template or self.chat_template
        if template is None:
            raise ChatTemplateError(
                f"model {self.name!r} has no chat template; use the completions API or pass "
                "a chat_template"
            )
        kwargs.setdefault("bos_token", self.bos_token)
        kwargs.setdefault("eos_token", self.eos_token)
        return render_chat_template(
            template, messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        add_special_tokens: bool = False,
        **kwargs: Any,
    ) -> list[int]:
        """Prompt token ids for `messages`, the one way a chat prompt is made: the rendered
        template, tokenized without special tokens by default (the template writes BOS
        itself, so BOS never appears twice)."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **kwargs)
        return self.encode(text, add_special_tokens=add_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> Tokenizer:
    """Load from a Hugging Face folder, a .gguf file, or a folder holding one .gguf file."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise ModelLoadError(f"{path} not found")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        gguf_path = find_gguf_file(path)
        if gguf_path is not None:
            return _load_gguf(gguf_path)
    return _load_hf_folder(path)


def _load_gguf(path: str) -> Tokenizer:
    from ipc.gguf_metadata import gguf_tokenizer

    info = gguf_tokenizer(path)
    return Tokenizer(
        info.tokenizer,
        name=os.path.basename(path),
        bos_token_id=info.bos_token_id,
        eos_token_ids=info.eos_token_ids,
        chat_template=info.chat_template,
        eos_token_id=info.eos_token_id,
    )


def _load_hf_folder(path: str) -> Tokenizer:
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if not os.path.isdir(path) or not os.path.exists(tokenizer_file):
        raise ModelLoadError(
            f"{tokenizer_file} not found: headrace reads fast tokenizers (tokenizer.json) "
            "or GGUF files"
        )
    try:
        tok = HFTokenizer.from_file(tokenizer_file)
    except Exception as e:  # tokenizers raises its own Exception subclass
        raise ModelLoadError(f"{tokenizer_file}: cannot load tokenizer: {e}") from e
    tok_config = read_json(os.path.join(path, "tokenizer_config.json"), required=False)
    config = read_json(os.path.join(path, "config.json"), required=False)
    gen_config = read_json(os.path.join(path, "generation_config.json"), required=False)

    def token_id(value: Any) -> int | None:
        if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_configs
            value = value.get("content")
        return tok.token_to_id(value) if isinstance(value, str) else None

    eos_ids: set[int] = set()
    for source in (gen_config.get("eos_token_id"), config.get("eos_token_id")):
        if isinstance(source, int):
            eos_ids.add(source)
        elif isinstance(source, list):
            eos_ids.update(i for i in source if isinstance(i, int))
    eos = token_id(tok_config.get("eos_token"))
    if eos is not None:
        eos_ids.add(eos)
    bos = token_id(tok_config.get("bos_token"))
    if bos is None:
        bos = gen_config.get("bos_token_id", config.get("bos_token_id"))
    return Tokenizer(
        tok,
        name=os.path.basename(path.rstrip(os.sep)),
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=eos_ids,
        chat_template=_chat_template(path, tok_config),
        eos_token_id=eos,
    )


def _chat_template(path: str, tok_config: dict[str, Any]) -> str | None:
    """chat_template.jinja if present (transformers 4.43+ writes it), else tokenizer_config's
    `chat_template`, a string or a list of named templates (the "default" one is used)."""
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{jinja_path}: cannot read chat template: {e}") from e
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
