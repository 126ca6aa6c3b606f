"""Incremental detokenization: text deltas as a request's tokens stream in, with stop strings.

Decoding token by token is wrong in two ways: a character may span several tokens
(byte-fallback and byte-level tokens carry one UTF-8 byte each), and SentencePiece
decoders strip the leading space of the first token decoded. So, like vLLM, each step
decodes a short window of recent tokens twice, with and without the new ones, and emits
the difference:

    ids:   ... prompt ... | out0 out1 out2 | out3 out4
                          ^prefix          ^read      (new tokens after read)
    delta = decode(ids[prefix:]) - decode(ids[prefix:read])

The window starts inside the prompt, so a leading space of the first output token
survives. It starts on a character: the prompt suffix is the shortest of at least 5 tokens
whose own decode is clean (no U+FFFD, as vLLM picks it), since a suffix starting inside a
byte-fallback run would make the decoder turn the whole run, output bytes too, into U+FFFD. A delta that ends in U+FFFD (an incomplete UTF-8 character) is held back until
the character's last byte arrives. With SentencePiece byte fallback, text ending in a
`<0xNN>` token waits for the run of byte tokens to end: a later invalid byte turns the
whole run into U+FFFD in `decode`. When special tokens are skipped they are dropped
before decoding, so they never begin a window (where a decoder would strip a space).

Byte-level tokenizers (no byte-fallback tokens: Llama 3, GPT-2 style) step a `tokenizers`
DecodeStream instead, which runs the same two-decode window in Rust, primed with the same
prompt context: one native call per token instead of two decodes and their Python around
them (the largest share of the gateway's CPU per streamed token). `HEADRACE_DETOKENIZER=window`
keeps the Python window for every tokenizer; a stream that errors falls back to it.

Stop strings are matched on the decoded text, across token boundaries; a tail that could
be the start of a stop string is held back until it can't. The rules are vLLM's: of
several stop strings in new text, the one that completes first wins (ties: list order); a
match must end after the text of the first `min_tokens` tokens; and the token that stopped
the request in the worker (EOS, a stop token id) adds no text unless
`include_stop_str_in_output`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

from tokenizers.decoders import DecodeStream

# Prompt tokens decoded as context before the first output token (vLLM uses 5 too), and
# how far the context may grow to start on a character.
PROMPT_CONTEXT_TOKENS = 5
MAX_PROMPT_CONTEXT_TOKENS = 24
REPLACEMENT_CHAR = "\ufffd"
ENV = "HEADRACE_DETOKENIZER"  # "window": never the DecodeStream


class _Tokenizer(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def is_special(self, token_id: int) -> bool: ...

    @property
    def byte_fallback_ids(self) -> frozenset[int]: ...


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas; see the module docstring."""

    def __init__(
        self,
        tokenizer: _Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        # spaces_between_special_tokens only affects transformers' slow tokenizers; fast
        # tokenizers (ours) join special tokens without spaces either way.
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self.min_tokens = min_tokens
        self.num_tokens = 0  # output tokens fed so far, special or not
        self._stop_floor = 0  # a stop match must end past this much text (min_tokens)

        context = self._prompt_context([t for t in prompt_token_ids if self._keep(t)])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""  # all decoded output text, emitted or held back for stop strings
        self.output_text = ""  # all text emitted so far
        self.stopped: str | None = None
        self._stream, self._raw = self._decode_stream(context)

    def _prompt_context(self, prompt: list[int]) -> list[int]:
        """The prompt suffix the window starts with: the shortest (of at least 5 tokens)
        whose decode has no U+FFFD; else one that at least does not start with one."""
        if len(prompt) <= PROMPT_CONTEXT_TOKENS:
            return prompt
        fallback = prompt[-PROMPT_CONTEXT_TOKENS:]
        found_fallback = False
        for n in range(PROMPT_CONTEXT_TOKENS, min(len(prompt), MAX_PROMPT_CONTEXT_TOKENS) + 1):
            suffix = prompt[-n:]
            text = self.tokenizer.decode(suffix, self.skip_special_tokens)
            if REPLACEMENT_CHAR not in text:
                return suffix
            if not found_fallback and not text.startswith(REPLACEMENT_CHAR):
                fallback, found_fallback = suffix, True
        return fallback

    def _decode_stream(self, context: list[int]) -> tuple[Any, Any]:
        """(DecodeStream primed with the context, raw tokenizer), or (None, None) where the
        Python window must decode: byte fallback (its runs wait for their end, see above)."""
        raw = getattr(self.tokenizer, "raw", None)
        if raw is None or self.tokenizer.byte_fallback_ids or os.environ.get(ENV) == "window":
            return None, None
        return DecodeStream(ids=context, skip_special_tokens=self.skip_special_tokens), raw

    def _feed(self, ids: Sequence[int]) -> str:
        """Append the kept ones of `ids` to the window; the text now complete."""
        kept = [t for t in ids if self._keep(t)]
        if self._stream is None:
            self._ids.extend(kept)
            return self._decode_new(final=False)
        pieces: list[str] = []
        for t in kept:
            self._ids.append(t)
            try:
                piece = self._stream.step(self._raw, t)
            except Exception:  # the stream lost its prefix: the Python window from here on
                self._stream = None
                return "".join(pieces) + self._decode_new(final=False)
            if piece is not None:  # the stream moved its window as _decode_new would
                pieces.append(piece)
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)
        return "".join(pieces)

    def _keep(self, token_id: int) -> bool:
        return not (self.skip_special_tokens and self.tokenizer.is_special(token_id))

    def add(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> str:
        """Feed new output tokens; returns the text that is now safe to emit (may be "").

        `stop_terminated`: the last token ended the request in the worker (EOS or a stop
        token id); its text is dropped unless include_stop_str_in_output.
        """
        if self.stopped is not None:
            return ""
        ids = list(new_token_ids)
        self.num_tokens += len(ids)
        if stop_terminated and ids and not self.include_stop_str_in_output:
            ids.pop()
        inside = len(ids) - max(0, self.num_tokens - self.min_tokens)
        if inside > 0:  # tokens among the first min_tokens: their text cannot end a stop
            self._text += self._feed(ids[:inside])
            self._stop_floor = len(self._text)
            ids = ids[inside:]
        self._text += self._feed(ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of the stream: emit everything held back (unless a stop matched)."""
        if self.stopped is not None:
            return ""
        self._text += self._decode_new(final=True)
        return self._emit(final=True)

    def _decode_new(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(
            self._ids[self._prefix_offset : self._read_offset], self.skip_special_tokens
        )
        full_text = decode(self._ids[self._prefix_offset :], self.skip_special_tokens)
        if not final and (
            len(full_text) <= len(prefix_text)
            or full_text.endswith(REPLACEMENT_CHAR)
            or self._ids[-1] in self.tokenizer.byte_fallback_ids
        ):
            return ""  # nothing yet, or a character (or a run of byte tokens) still open
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def _emit(self, final: bool) -> str:
        """Emit text up to a stop string, holding back a tail that may begin one."""
        end = len(self._text)
        if self.stop:
            first = self._first_stop()
            if first is not None:
                i, s = first
                self.stopped = s
                end = i + len(s) if self.include_stop_str_in_output else i
            elif not final:
                end -= self._partial_stop_len()
        delta = self._text[len(self.output_text) : end] if end > len(self.output_text) else ""
        self.output_text += delta
        return delta

    def _first_stop(self) -> tuple[int, str] | None:
        """(start, stop string) of the match that completes first; ties go by list order."""
        first: tuple[int, str] | None = None
        # A match must end in text not yet emitted (earlier text was searched already)
        # and past the min_tokens text.
        floor = max(len(self.output_text), self._stop_floor)
        for s in self.stop:
            i = self._text.find(s, max(0, floor - len(s) + 1))
            if i >= 0 and (first is None or i + len(s) < first[0] + len(first[1])):
                first = (i, s)
        return first

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text = self._text
        for n in range(min(self._max_stop_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
