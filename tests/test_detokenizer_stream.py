"""The DecodeStream path of the incremental detokenizer (byte-level tokenizers) against the
Python window: random token ids of the whole Llama 3 vocabulary (partial UTF-8 bytes,
emoji, CJK, special tokens), with and without stop strings and min_tokens. Fed one token
at a time (a decode step's output) the deltas are the window's exactly; fed a few at once
the text is the same, but the stream may emit a token's text one add earlier: it steps
token by token, while the window holds a whole add back when its last token ends inside
a character."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gateway.detokenizer import ENV, IncrementalDetokenizer
from gateway.tokenizer import load_tokenizer

TEXTS = ["Hello, world! ", "日本語のテキスト ", "emoji 🤗🎉 ", "naïve café ", "\n\n  x = 1\n"]


def deltas(tok, prompt, chunks, monkeypatch, mode, **kw) -> tuple[list[str], str, bool]:
    if mode == "window":
        monkeypatch.setenv(ENV, "window")
    else:
        monkeypatch.delenv(ENV, raising=False)
    d = IncrementalDetokenizer(tok, prompt, **kw)
    streamed = d._stream is not None
    out = [d.add(c) for c in chunks]
    out.append(d.flush())
    return out, d.output_text, streamed


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("one_by_one", [True, False])
def test_stream_deltas_equal_the_window_deltas(
    llama3_tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, one_by_one: bool
) -> None:
    tok = load_tokenizer(str(llama3_tokenizer_path))
    rng = random.Random(seed)
    vocab = tok.vocab_size if hasattr(tok, "vocab_size") else 128256
    special = sorted(tok.special_ids)
    text = "".join(rng.choice(TEXTS) for _ in range(6))
    ids = tok.encode(text, add_special_tokens=False)
    for _ in range(rng.randint(5, 40)):  # random ids: lone UTF-8 bytes, odd merges
        ids.insert(rng.randrange(len(ids) + 1), rng.randrange(min(vocab, 128000)))
    if rng.random() < 0.5 and special:
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
    chunks, i = [], 0
    while i < len(ids):
        n = 1 if one_by_one else rng.choice([1, 1, 1, 2, 3])
        chunks.append(ids[i : i + n])
        i += n
    prompt = tok.encode(rng.choice(TEXTS) * rng.randint(1, 3))
    kw = dict(
        skip_special_tokens=rng.random() < 0.8,
        stop=[rng.choice(["x =", "🎉", "café", "zzz"])] if rng.random() < 0.5 else [],
        min_tokens=rng.choice([0, 0, 3]),
    )
    window = deltas(tok, prompt, chunks, monkeypatch, "window", **kw)
    stream = deltas(tok, prompt, chunks, monkeypatch, "stream", **kw)
    assert not window[2] and stream[2]  # each path ran
    assert stream[1] == window[1]  # the text
    if one_by_one:
        assert stream[0] == window[0]  # and every delta


def test_byte_fallback_tokenizers_keep_the_python_window(stories_path: Path) -> None:
    tok = load_tokenizer(str(stories_path))
    assert tok.byte_fallback_ids
    assert IncrementalDetokenizer(tok, [1, 2, 3])._stream is None
