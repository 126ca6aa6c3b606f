"""What a client written against vLLM's OpenAI server sends, and what it gets back, in
process (build_app over a fake engine): accepted fields behave as in vLLM, the rest are
400s naming the field (the list of refused fields is in gateway/protocol.py's docstring)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from serving_fakes import ScriptedClient, call
from test_gateway_inprocess import MODEL, FakeEngineClient

from gateway.app import GatewayConfig, build_app
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.serving_chat import create_chat_completion
from gateway.serving_completions import create_completion
from gateway.tokenizer import load_tokenizer
from gateway.tool_calling import ToolOptions
from ipc.messages import FinishReason

TEMPLATE = (
    "{{ bos_token }}{% if tools %}[tools {{ tools | length }}]{% endif %}"
    "{% if greeting is defined %}[{{ greeting }}]{% endif %}"
    "{% if documents %}[docs {{ documents | length }}]{% endif %}"
    "{% if reasoning_effort %}[effort {{ reasoning_effort }}]{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
USER = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.fixture
def fake(stories_path: Path) -> FakeEngineClient:
    client = FakeEngineClient(stories_path)
    tok = client.models[MODEL].tokenizer
    assert tok is not None
    tok.chat_template = TEMPLATE
    return client


def send(client: FakeEngineClient, path: str, body: dict[str, Any]) -> httpx.Response:
    app = build_app(GatewayConfig(workers=["unused"]), client)  # type: ignore[arg-type]

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.post(path, json=body)

    return asyncio.run(go())


def chat(client: FakeEngineClient, **body: Any) -> httpx.Response:
    return send(client, "/v1/chat/completions", {"model": MODEL, "messages": USER, **body})


def events(r: httpx.Response) -> list[Any]:
    assert r.status_code == 200, r.text
    assert r.text.endswith("data: [DONE]\n\n")
    frames = r.text.split("\n\n")
    assert all(f.startswith("data: ") for f in frames if f)  # nothing but data frames
    return [json.loads(f[6:]) for f in frames if f and f != "data: [DONE]"]


def assert_400(r: httpx.Response, param: str, says: str = "") -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["param"], err["code"], err["type"]) == (param, 400, "invalid_request_error")
    assert says in err["message"], err["message"]


def prompt_text(client: FakeEngineClient) -> str:
    tok = client.models[MODEL].tokenizer
    assert tok is not None
    return tok.decode(client.submitted[-1].prompt_token_ids, skip_special_tokens=True)


# ------------------------------------------------------------------ chat: sampling fields


def test_max_completion_tokens_wins_over_max_tokens(fake: FakeEngineClient) -> None:
    r = chat(fake, max_tokens=5, max_completion_tokens=3)
    assert r.json()["usage"]["completion_tokens"] == 3
    assert fake.submitted[-1].params.max_tokens == 3
    assert chat(fake, max_tokens=4).json()["usage"]["completion_tokens"] == 4
    assert_400(chat(fake, max_completion_tokens=0), "max_completion_tokens")
    assert_400(chat(fake, max_completion_tokens=300), "max_completion_tokens", "context length")
    assert_400(chat(fake, max_tokens=300), "max_tokens", "maximum context length is 256")


def test_n2_choices_and_usage_whole_and_streamed(fake: FakeEngineClient) -> None:
    whole = chat(fake, n=2, max_tokens=3, seed=7).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    assert [c["finish_reason"] for c in whole["choices"]] == ["length", "length"]
    prompt = whole["usage"]["prompt_tokens"]
    assert whole["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 6,
        "total_tokens": prompt + 6,
    }
    assert [c.params.seed for c in fake.submitted[-2:]] == [7, 8]  # the n samples differ
    chunks = events(
        chat(fake, n=2, max_tokens=3, stream=True, stream_options={"include_usage": True})
    )
    roles = [
        c["choices"][0]["index"]
        for c in chunks
        if c["choices"] and "role" in c["choices"][0]["delta"]
    ]
    assert roles == [0, 1]
    finished = [
        c["choices"][0]["index"]
        for c in chunks
        if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert sorted(finished) == [0, 1]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    for c in chunks:
        assert c["id"].startswith("chatcmpl-") and c["object"] == "chat.completion.chunk"
        assert c["id"] == chunks[0]["id"] and isinstance(c["created"], int)
        assert "system_fingerprint" in c


def test_stream_options(fake: FakeEngineClient) -> None:
    # Naming stream_options asks for the usage chunk (vLLM's default include_usage).
    assert events(chat(fake, max_tokens=2, stream=True, stream_options={}))[-1]["choices"] == []
    plain = events(chat(fake, max_tokens=2, stream=True))
    assert all(c["choices"] and c["usage"] is None for c in plain)
    cont = {"include_usage": True, "continuous_usage_stats": True}
    chunks = events(chat(fake, max_tokens=3, stream=True, stream_options=cont))
    assert all(c["usage"] is not None for c in chunks)
    done = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert done[0] == 0 and done[-1] == 3 and done == sorted(done)  # role chunk first
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {"messages": USER}),
        ("/v1/completions", {"prompt": "x"}),
    ]
    for path, body in bodies:
        r = send(fake, path, {"model": MODEL, **body, "stream_options": {"include_usage": True}})
        assert_400(r, "stream_options", "stream=True")
    assert fake.submitted[-1].params.max_tokens == 3  # the refused ones reached nothing


def test_logprobs_bounds(fake: FakeEngineClient) -> None:
    assert chat(fake, max_tokens=1, top_logprobs=0).status_code == 200  # vLLM allows 0 alone
    assert chat(fake, max_tokens=1, logprobs=True, top_logprobs=20).status_code == 200
    assert_400(chat(fake, top_logprobs=2), "top_logprobs", "`logprobs` must be set to true")
    assert_400(chat(fake, logprobs=True, top_logprobs=21), "top_logprobs")
    assert_400(chat(fake, logprobs=True, top_logprobs=-1), "top_logprobs")
    assert_400(chat(fake, top_logprobs="3"), "top_logprobs")


def test_logit_bias_and_allowed_token_ids_reach_the_worker(fake: FakeEngineClient) -> None:
    assert_400(chat(fake, logit_bias={"abc": 1}), "logit_bias", "token ids")
    assert_400(chat(fake, logit_bias={"99999": 1}), "logit_bias", "out of vocabulary")
    assert_400(chat(fake, logit_bias={"5": 101}), "logit_bias", "[-100, 100]")
    assert chat(fake, max_tokens=1, logit_bias={}).status_code == 200
    assert fake.submitted[-1].params.logit_bias is None
    r = chat(fake, max_tokens=1, logit_bias={"5": 10, "7": -100.0})
    assert r.status_code == 200, r.text
    assert fake.submitted[-1].params.logit_bias == {5: 10.0, 7: -100.0}
    r = complete(fake, prompt="x", max_tokens=1, allowed_token_ids=[3, 4])
    assert r.status_code == 200, r.text
    assert fake.submitted[-1].params.allowed_token_ids == [3, 4]
    assert_400(chat(fake, allowed_token_ids=[]), "allowed_token_ids", "empty")
    assert_400(chat(fake, allowed_token_ids=[99999]), "allowed_token_ids", "out of vocabulary")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.01),
        ("presence_penalty", 2.1), ("frequency_penalty", -2.1), ("seed", 2**64),
        ("n", 0), ("temperature", "hot"), ("stop", 5), ("max_tokens", 1.5),
        ("messages", "Hi"), ("tools", {}),
    ],
)  # fmt: skip
def test_out_of_range_or_wrong_type_names_the_field(
    fake: FakeEngineClient, field: str, value: Any
) -> None:
    assert_400(chat(fake, **{field: value}), field)


def test_accepted_as_vllm_accepts(fake: FakeEngineClient) -> None:
    ok: dict[str, Any] = dict(
        max_tokens=1, temperature=2, top_p=1, presence_penalty=-2, frequency_penalty=2
    )
    ok |= dict(seed=-(2**63), stop=["a", "b", "c", "d", "e"], user="u-1")  # five: vLLM allows
    ok |= dict(n=None, stream=None, logprobs=None, parallel_tool_calls=None, top_logprobs=None)
    ok |= {"metadata": {"k": "v"}, "store": False, "service_tier": "auto", "no_such_field": 1}
    r = chat(fake, **ok)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["system_fingerprint"] is None and isinstance(body["created"], int)
    assert "tool_calls" not in body["choices"][0]["message"]
    assert chat(fake, max_tokens=1, stop="x").status_code == 200


# ------------------------------------------------------------------ chat: messages


def test_message_shapes(fake: FakeEngineClient) -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    msgs = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": parts, "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]  # fmt: skip
    r = chat(fake, messages=msgs, max_tokens=1)
    assert r.status_code == 200, r.text
    assert "Hello\nthere" in prompt_text(fake)  # text parts joined, as vLLM joins them
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    r = chat(fake, messages=[{"role": "user", "content": [image]}])
    assert_400(r, "messages", "'image_url'")
    assert_400(chat(fake, messages=[]), "messages", "non-empty")
    assert_400(chat(fake, messages=[{"role": "wizard", "content": "x"}]), "messages")


def test_continue_final_message_and_echo(fake: FakeEngineClient) -> None:
    msgs = [*USER, {"role": "assistant", "content": "Once upon"}]
    r = chat(fake, messages=msgs, continue_final_message=True, max_tokens=1)
    assert r.status_code == 200, r.text
    assert prompt_text(fake).endswith("<|assistant|>Once upon")  # no newline: still open
    r = chat(fake, messages=msgs, continue_final_message=True, add_generation_prompt=True)
    assert_400(r, "continue_final_message", "Cannot set both")
    echoed = chat(fake, messages=msgs, continue_final_message=True, echo=True, max_tokens=2)
    whole = echoed.json()["choices"][0]["message"]["content"]
    assert whole.startswith("Once upon") and len(whole) > len("Once upon")
    body = dict(messages=msgs, continue_final_message=True, echo=True, max_tokens=2, stream=True)
    streamed = "".join(
        c["choices"][0]["delta"].get("content", "") for c in events(chat(fake, **body))
    )
    assert streamed == whole
    # echo only repeats an assistant's last message
    assert (
        chat(fake, echo=True, max_tokens=2).json()["choices"][0]["message"]["content"] == whole[9:]
    )


def test_add_generation_prompt_and_template_kwargs(fake: FakeEngineClient) -> None:
    chat(fake, add_generation_prompt=False, max_tokens=1)
    assert not prompt_text(fake).endswith("<|assistant|>")
    chat(fake, chat_template_kwargs={"greeting": "hey", "messages": "ignored"}, max_tokens=1)
    assert "[hey]" in prompt_text(fake) and "<|user|>Hi" in prompt_text(fake)
    assert_400(chat(fake, chat_template="{{ 1 }}"), "chat_template")


def test_tools_fields(fake: FakeEngineClient) -> None:
    assert_400(chat(fake, tools=[]), "tools", "empty array")
    chat(fake, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert "[tools 1]" in prompt_text(fake)  # vLLM shows them to the template under "none"
    assert_400(chat(fake, tools=TOOLS), "tool_choice", "--enable-auto-tool-choice")
    assert_400(chat(fake, tool_choice="required"), "tool_choice")
    named = {"type": "function", "function": {"name": "g"}}
    assert_400(chat(fake, tools=TOOLS, tool_choice=named), "tool_choice")
    bad = {"type": "json_schema", "json_schema": {"name": "x"}}
    assert_400(chat(fake, response_format=bad), "response_format")
    assert_400(chat(fake, response_format={"type": "yaml"}), "response_format")
    assert chat(fake, response_format={"type": "text"}, max_tokens=1).status_code == 200


@pytest.mark.parametrize(
    ("tool_choice", "finish"),
    [("required", "tool_calls"), ({"type": "function", "function": {"name": "f"}}, "stop")],
)
@pytest.mark.parametrize("stream", [False, True])
def test_tool_finish_reason_as_openai(
    llama3_tokenizer_path: Path, tool_choice: Any, finish: str, stream: bool
) -> None:
    tok = load_tokenizer(str(llama3_tokenizer_path))
    tok.chat_template = TEMPLATE
    text = '[{"name": "f", "parameters": {"a": 1}}]' if tool_choice == "required" else '{"a": 1}'
    ids = tok.encode(text, add_special_tokens=False)
    client = ScriptedClient(tok, lambda child: ids, finish=FinishReason.STOP)
    body = dict(model="m", messages=USER, tools=TOOLS, tool_choice=tool_choice, stream=stream)
    req = msgspec.convert(body, ChatCompletionRequest)  # as the HTTP body is decoded

    async def run(client: Any, metrics: Any, r: Any) -> Any:
        return await create_chat_completion(client, metrics, r, ToolOptions())

    out = call(run, client, req)
    if stream:
        reasons = [c["choices"][0]["finish_reason"] for c in out[:-1] if c["choices"]]
        calls = [tc for c in out[:-1] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
        assert reasons[-1] == finish and calls and calls[0]["function"]["name"] == "f"
    else:
        choice = out.choices[0]
        assert choice.finish_reason == finish and choice.message.tool_calls[0].function.name == "f"


# ------------------------------------------------------------------ completions


def complete(client: FakeEngineClient, **body: Any) -> httpx.Response:
    return send(client, "/v1/completions", {"model": MODEL, **body})


def test_completion_prompt_shapes_and_indexes(fake: FakeEngineClient) -> None:
    r = complete(fake, prompt=[[5, 6, 7], [8, 9]], n=2, max_tokens=2)
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 8
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert "system_fingerprint" in body
    assert [c.prompt_token_ids for c in fake.submitted[-4:]] == [[5, 6, 7]] * 2 + [[8, 9]] * 2
    for prompt in ("Once", ["Once", "Twice"], [5, 6]):
        assert complete(fake, prompt=prompt, max_tokens=1).status_code == 200
    chunks = events(complete(fake, prompt=["a", "b"], max_tokens=2, stream=True, stream_options={}))
    assert sorted({c["choices"][0]["index"] for c in chunks[:-1]}) == [0, 1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_completion_echo_and_max_tokens_null(fake: FakeEngineClient) -> None:
    r = complete(fake, prompt="Once upon", echo=True, max_tokens=1)
    assert r.json()["choices"][0]["text"].startswith("Once upon")
    r = complete(fake, prompt=[5, 6], max_tokens=None)
    assert r.json()["usage"]["completion_tokens"] == 256 - 2  # up to the model's length
    assert complete(fake, prompt="x").json()["usage"]["completion_tokens"] == 16  # OpenAI's


@pytest.mark.parametrize("stream", [False, True])
def test_completion_echo_without_generation(stories_path: Path, stream: bool) -> None:
    # lm-eval's loglikelihood requests: echo, max_tokens 0, logprobs: the prompt scored.
    tok = load_tokenizer(str(stories_path))
    client = ScriptedClient(tok, lambda child: [7])
    body = dict(model="m", prompt="Once upon a time", echo=True, max_tokens=0, logprobs=1)
    req = msgspec.convert(
        body | {"stream": stream, "stream_options": {}} if stream else body, CompletionRequest
    )
    out = call(create_completion, client, req)
    n_prompt = len(tok.encode("Once upon a time"))
    if stream:
        choices = [c["choices"][0] for c in out[:-2]]
        assert out[-2]["usage"]["completion_tokens"] == 0
        assert "".join(c["text"] for c in choices) == "Once upon a time"
        lps = [t for c in choices for t in c["logprobs"]["token_logprobs"]]
        assert choices[-1]["finish_reason"] == "length"
    else:
        choice = out.choices[0]
        assert choice.text == "Once upon a time" and out.usage.completion_tokens == 0
        lps = choice.logprobs.token_logprobs
    assert len(lps) == n_prompt and lps[0] is None and all(v is not None for v in lps[1:])


def test_completion_refusals(fake: FakeEngineClient) -> None:
    assert_400(complete(fake, prompt="x", suffix="y"), "suffix", "not currently supported")
    assert_400(complete(fake, prompt="x", best_of=2), "best_of")
    assert complete(fake, prompt="x", best_of=2, n=2, max_tokens=1).status_code == 200
    assert_400(complete(fake, prompt="x", logprobs=21), "logprobs")
    assert complete(fake, prompt="x", logprobs=20, max_tokens=1).status_code == 200
    r = complete(fake, prompt=list(range(3, 300)))
    assert_400(r, "prompt", "maximum context length is 256 tokens")
    assert_400(complete(fake, prompt="x", max_tokens=300), "max_tokens", "maximum context length")
    assert_400(complete(fake, prompt=[]), "prompt")
    assert_400(complete(fake, prompt=[1, 99999]), "prompt")
    assert_400(complete(fake, prompt=[[1], "a"]), "prompt")


def test_unknown_model_and_routes(fake: FakeEngineClient) -> None:
    r = complete(fake, model="nope", prompt="x")
    assert r.status_code == 404
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 404
    assert "`nope` does not exist" in err["message"]
    app = build_app(GatewayConfig(workers=["unused"]), fake)  # type: ignore[arg-type]

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.get(path)

    models = asyncio.run(get("/v1/models")).json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 256
    assert card["parent"] is None and isinstance(card["created"], int) and "root" in card
    missing = asyncio.run(get("/v1/models/nope"))
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    r = asyncio.run(get("/v1/no-such-route"))
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


# ------------------------------------------------------------------ /tokenize


def test_tokenize_chat_fields(fake: FakeEngineClient) -> None:
    msgs = [*USER, {"role": "assistant", "content": "Once"}]
    body = {"model": MODEL, "messages": msgs, "continue_final_message": True}
    r = send(fake, "/tokenize", body | {"return_token_strs": True})
    out = r.json()
    assert out["count"] == len(out["tokens"]) == len(out["token_strs"])
    tok = fake.models[MODEL].tokenizer
    assert tok is not None
    assert tok.decode(out["tokens"]).endswith("Once")
    r = send(fake, "/tokenize", body | {"add_generation_prompt": True})
    assert_400(r, "continue_final_message")
    r = send(fake, "/tokenize", {"model": MODEL, "messages": USER, "tools": TOOLS})
    assert "[tools 1]" in tok.decode(r.json()["tokens"])
    assert "token_strs" not in send(fake, "/tokenize", {"model": MODEL, "prompt": "a"}).json()


def test_structured_outputs_as_vllm_names_them(fake: FakeEngineClient) -> None:
    so = {"choice": ["yes", "no"]}
    assert chat(fake, structured_outputs=so, max_tokens=1).status_code == 200
    guided = fake.submitted[-1].params.guided
    assert guided is not None and guided.source == 'root ::= "yes" | "no"'
    r = complete(fake, prompt="x", structured_outputs={"json": {"type": "object"}}, max_tokens=1)
    assert r.status_code == 200 and fake.submitted[-1].params.guided is not None
    assert_400(
        chat(fake, structured_outputs={"regex": "a+", "choice": ["a"]}), "structured_outputs"
    )
    assert_400(chat(fake, structured_outputs={"structural_tag": "{}"}), "structured_outputs")
    assert_400(chat(fake, structured_outputs={"grammar": "root ::= ("}), "structured_outputs")


def test_vllm_extras(fake: FakeEngineClient) -> None:
    r = complete(fake, prompt=list(range(3, 300)), truncate_prompt_tokens=10, max_tokens=1)
    assert r.status_code == 200, r.text
    assert fake.submitted[-1].prompt_token_ids == list(range(290, 300))
    assert r.json()["usage"]["prompt_tokens"] == 10
    r = complete(fake, prompt="x", truncate_prompt_tokens=999)
    assert_400(r, "truncate_prompt_tokens", "max_model_len")
    chat(fake, truncate_prompt_tokens=3, max_tokens=1)
    assert len(fake.submitted[-1].prompt_token_ids) == 3
    for name, value in [
        ("use_beam_search", True),
        ("bad_words", ["a"]),
    ]:
        assert_400(chat(fake, **{name: value}), name, "not supported")
        assert_400(complete(fake, prompt="x", **{name: value}), name, "not supported")
    assert_400(chat(fake, priority=1), "priority", "not enabled")
    assert chat(fake, priority=0, max_tokens=1).status_code == 200
    chat(fake, documents=[{"title": "t", "text": "doc"}], reasoning_effort="low", max_tokens=1)
    assert "[docs 1][effort low]" in prompt_text(fake)
    assert_400(chat(fake, prompt_logprobs=1, stream=True), "prompt_logprobs", "stream=True")


def test_chat_prompt_logprobs_are_returned(stories_path: Path) -> None:
    tok = load_tokenizer(str(stories_path))
    tok.chat_template = TEMPLATE
    client = ScriptedClient(tok, lambda child: [5, 6])
    body = dict(model="m", messages=USER, prompt_logprobs=1, max_tokens=2)
    out = call(create_chat_completion, client, msgspec.convert(body, ChatCompletionRequest))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) > 2
    assert all(isinstance(k, int) for k in out.prompt_logprobs[1])


def test_return_token_ids(fake: FakeEngineClient) -> None:
    body = chat(fake, max_tokens=3, return_token_ids=True).json()
    prompt = fake.submitted[-1].prompt_token_ids
    assert body["prompt_token_ids"] == prompt and body["choices"][0]["token_ids"] == [403] * 3
    chunks = events(chat(fake, max_tokens=3, return_token_ids=True, stream=True))
    assert chunks[0]["prompt_token_ids"] == prompt
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0].get("token_ids", [])] == [403] * 3
    assert "prompt_token_ids" not in chat(fake, max_tokens=1).json()
    out = complete(fake, prompt=[[5, 6], [7]], max_tokens=2, return_token_ids=True).json()
    assert [c["prompt_token_ids"] for c in out["choices"]] == [[5, 6], [7]]
    assert [c["token_ids"] for c in out["choices"]] == [[403, 403]] * 2
    chunks = events(complete(fake, prompt=[5, 6], max_tokens=2, return_token_ids=True, stream=True))
    assert chunks[0]["choices"][0]["prompt_token_ids"] == [5, 6]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == [403, 403]
