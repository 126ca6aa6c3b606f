"""Stop rules as vLLM applies them (issue 22, points 6-8): min_tokens holds off stop strings,
a stop token's text is dropped, and of several stop strings the one completing first wins."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import LLAMA3_TOKENIZER, STORIES
from test_detokenizer import stream

from gateway.detokenizer import IncrementalDetokenizer
from gateway.sequence import SequenceState
from gateway.tokenizer import Tokenizer, load_tokenizer
from ipc.messages import FinishReason, RequestOutput, SamplingParams

EOT = 128009  # llama3's <|eot_id|>


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return load_tokenizer(str(LLAMA3_TOKENIZER))


@pytest.fixture(scope="module")
def stories() -> Tokenizer:
    return load_tokenizer(str(STORIES))


def feed(seq: SequenceState, outs: list[RequestOutput]) -> str:
    for out in outs:
        seq.update(out)
    return seq.text


# ---- 6: min_tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[], [3], [8]])
def test_min_tokens_holds_off_stop_strings(llama3: Tokenizer, chunks: list[int]) -> None:
    """vLLM's case: min_tokens 5, stop "e": the e's of the first 5 tokens do not count."""
    ids = llama3.encode(" is Lee, and I'm a student", add_special_tokens=False)
    detok = IncrementalDetokenizer(llama3, [], stop=["e"], min_tokens=5)
    assert "".join(stream(detok, ids, chunks)) == " is Lee, and I'm a stud"
    assert detok.stopped == "e"
    # Without min_tokens the first "e" stops it.
    assert "".join(stream(IncrementalDetokenizer(llama3, [], stop=["e"]), ids)) == " is L"


def test_min_tokens_lets_a_stop_string_end_after_them(llama3: Tokenizer) -> None:
    """A stop string may start in the first min_tokens tokens' text and end after it."""
    ids = llama3.encode(" is Lee, and", add_special_tokens=False)  # " is", " Lee", ",", " and"
    detok = IncrementalDetokenizer(llama3, [], stop=["Lee,"], min_tokens=2)
    assert "".join(stream(detok, ids)) == " is " and detok.stopped == "Lee,"
    detok = IncrementalDetokenizer(llama3, [], stop=["Lee"], min_tokens=2)
    assert "".join(stream(detok, ids)) == " is Lee, and" and detok.stopped is None


def test_min_tokens_in_sequence_state(llama3: Tokenizer) -> None:
    ids = llama3.encode(" is Lee, and I'm a student", add_special_tokens=False)
    seq = SequenceState(llama3, [1], SamplingParams(max_tokens=50, stop=["e"], min_tokens=5))
    assert feed(seq, [RequestOutput("r", ids)]) == " is Lee, and I'm a stud"
    assert seq.finish_reason == "stop" and seq.stop_reason == "e" and seq.num_tokens == 8


# ---- 7: a stop token's text ----------------------------------------------------------------


@pytest.mark.parametrize("include", [False, True])
def test_eos_text_dropped_unless_include_stop_str(llama3: Tokenizer, include: bool) -> None:
    ids = [*llama3.encode("Hi there", add_special_tokens=False), EOT]
    params = SamplingParams(
        max_tokens=50, skip_special_tokens=False, include_stop_str_in_output=include, logprobs=0
    )
    seq = SequenceState(llama3, [128000], params)
    out = RequestOutput("r", ids, finish_reason=FinishReason.STOP)
    assert feed(seq, [out]) == ("Hi there<|eot_id|>" if include else "Hi there")
    assert seq.num_tokens == 3 and seq.finish_reason == "stop"


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_id_text_dropped(stories: Tokenizer, include: bool) -> None:
    ids = stories.encode("Once upon a time there", add_special_tokens=False)
    stop_id = ids[-1]
    params = SamplingParams(
        max_tokens=50, stop_token_ids=[stop_id], include_stop_str_in_output=include
    )
    seq = SequenceState(stories, [1], params)
    outs = [
        RequestOutput("r", ids[:2]),
        RequestOutput("r", ids[2:], finish_reason=FinishReason.STOP, stop_reason=stop_id),
    ]
    want = stories.decode(ids) if include else stories.decode(ids[:-1])
    assert feed(seq, outs) == want and seq.stop_reason == stop_id
    assert seq.num_tokens == len(ids)


def test_stop_token_text_dropped_offline(stories_path: Path) -> None:
    from headrace.llm import LLM

    llm = LLM(str(stories_path), device="cpu")
    full = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=20))[0]
    ids = full.outputs[0].token_ids
    stop_id = next(t for i, t in enumerate(ids) if i >= 3 and t not in ids[:i])
    r = llm.generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=60, stop_token_ids=[stop_id])
    )[0].outputs[0]
    assert r.token_ids == ids[: ids.index(stop_id) + 1]  # the stop token is still a token
    assert r.text == llm.tokenizer.decode(r.token_ids[:-1])  # but its text is not output


# ---- 8: several stop strings in one chunk --------------------------------------------------


@pytest.mark.parametrize(
    "stops,text,stopped",
    [
        (["bcd", "c"], "ab", "c"),  # "c" completes first though "bcd" starts first
        (["c", "bc"], "ab", "c"),  # both complete at once: list order
        (["bc", "c"], "a", "bc"),
        (["ef", "bcdx", "de"], "abc", "de"),
    ],
)
def test_stop_string_completing_first_wins(
    stories: Tokenizer, stops: list[str], text: str, stopped: str
) -> None:
    ids = stories.encode("abcdef", add_special_tokens=False)  # one token per letter
    detok = IncrementalDetokenizer(stories, [], stop=stops)
    assert detok.add(ids) == text and detok.stopped == stopped
    detok = IncrementalDetokenizer(stories, [], stop=stops, include_stop_str_in_output=True)
    assert detok.add(ids) == text + stopped
