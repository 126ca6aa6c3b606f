"""Tool calling and structured output in the gateway, without a server: what the template
sees, which grammar each tool_choice forces, and the 400s."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from gateway.errors import BadRequest
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.structured_output import checked_guided_decoding, guided_decoding
from gateway.tool_calling import ToolOptions, plan_tools
from ipc.messages import GrammarKind

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TEMPLATE = (
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
    "{{ c.function.arguments | tojson }} id={{ c.id }}{% endfor %}{% endif %}"
    "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}{{ m.content }}\n{% endfor %}"
)


def chat(**body) -> ChatCompletionRequest:
    return msgspec.convert(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body},
        ChatCompletionRequest,
    )


def test_tools_and_tool_history_reach_the_template(llama3_tokenizer_path):
    from gateway.engine_client import ModelEntry
    from gateway.serving_chat import chat_prompt_ids
    from gateway.tokenizer import load_tokenizer
    from ipc.messages import ModelInfo

    tok = load_tokenizer(str(llama3_tokenizer_path))
    tok.chat_template = TEMPLATE
    entry = ModelEntry("m", ModelInfo("m", "", 4096, tok.vocab_size, "w"), tok)
    req = chat(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        ],
        tools=TOOLS,
        tool_choice="required",
    )
    plan = plan_tools(req, ToolOptions())
    ids = chat_prompt_ids(entry, req.messages, True, False, plan.template_tools)
    text = tok.decode(ids)
    assert 'TOOLS:[{"type": "function", "function": {"name": "get_weather"' in text
    # Arguments reach the template as an object (templates write `arguments | tojson`).
    assert 'CALL get_weather {"city": "Paris"} id=call_1' in text
    assert "<tool>[call_1]18 C" in text


def test_tool_choice_plans():
    none = plan_tools(chat(tools=TOOLS, tool_choice="none"), ToolOptions())
    # vLLM shows the template the tools under "none" too; nothing constrains or parses.
    assert none.template_tools and none.guided is None and none.extract is None
    required = plan_tools(
        chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), ToolOptions()
    )
    schema = json.loads(required.guided.source)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    assert schema["items"]["anyOf"][0]["properties"]["name"] == {
        "type": "string",
        "enum": ["get_weather"],
    }
    named = plan_tools(
        chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        ToolOptions(),
    )
    assert json.loads(named.guided.source) == TOOLS[0]["function"]["parameters"]
    auto = plan_tools(
        chat(tools=TOOLS), ToolOptions("hermes", True)
    )  # tools without tool_choice: auto
    assert auto.guided is None and auto.extract is not None and auto.template_tools


@pytest.mark.parametrize(
    ("body", "options", "match"),
    [
        ({"tools": TOOLS}, ToolOptions(), "--enable-auto-tool-choice"),
        ({"tool_choice": "required"}, ToolOptions(), "needs tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            ToolOptions(),
            "not in tools",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, ToolOptions(), "tool_choice must be"),
        ({"tools": [], "tool_choice": "none"}, ToolOptions(), "must not be an empty array"),
    ],
)
def test_tool_choice_errors(body, options, match):
    with pytest.raises(BadRequest, match=match):
        plan_tools(chat(**body), options)


def test_tool_options_validate():
    with pytest.raises(ValueError, match="--tool-call-parser"):
        ToolOptions("nope").validate()
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ToolOptions(None, True).validate()


def test_guided_fields_become_one_grammar():
    req = msgspec.convert(
        {"model": "m", "prompt": "x", "guided_choice": ['a "b"', "c"]}, CompletionRequest
    )
    found = guided_decoding(req)
    assert found is not None
    spec, field = found
    assert (spec.kind, field) == (GrammarKind.EBNF, "guided_choice")
    assert asyncio.run(checked_guided_decoding(req)) == spec  # parses
    obj = guided_decoding(chat(response_format={"type": "json_object"}))[0]
    assert json.loads(obj.source) == {"type": "object"}
    with pytest.raises(BadRequest, match="only one kind"):
        guided_decoding(chat(guided_regex="a+", guided_json={"type": "object"}))
    with pytest.raises(BadRequest, match="cannot be combined"):
        asyncio.run(
            checked_guided_decoding(
                chat(guided_regex="a+"),
                plan_tools(chat(tools=TOOLS, tool_choice="required"), ToolOptions()).guided,
            )
        )
    with pytest.raises(BadRequest, match="guided_json is not valid JSON"):
        guided_decoding(chat(guided_json="{nope"))
    with pytest.raises(BadRequest, match="type 'xml'"):
        guided_decoding(chat(response_format={"type": "xml"}))


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"guided_json": {"type": "objekt"}}, "guided_json", "objekt"),
        ({"guided_regex": "[a-"}, "guided_regex", "Unclosed"),
        ({"guided_grammar": 'root ::= "a" |'}, "guided_grammar", "EBNF"),
    ],
)
def test_bad_grammars_are_400s_naming_the_field(body, field, reason):
    with pytest.raises(BadRequest) as e:
        asyncio.run(checked_guided_decoding(chat(**body)))
    assert (
        e.value.param == field and reason in e.value.message and "/project/" not in e.value.message
    )
