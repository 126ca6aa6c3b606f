"""Tool calling for one chat request: what the template sees, what the output must follow,
and how the output becomes `tool_calls`.

    tool_choice   template gets tools   output constrained to          parsed by
    none          yes (as vLLM)         -                              - (plain content)
    auto          yes                   -                              --tool-call-parser
    required      yes                   [{"name", "parameters"}, ...]  required_calls
    {function}    yes                   that function's parameters     named_call

`required` and a named function are enforced with structured output, so their arguments
always parse (and need no --tool-call-parser); `auto` needs --enable-auto-tool-choice and
a parser, as in vLLM. Without tool_choice, requests with tools mean auto (OpenAI's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.errors import BadRequest
from gateway.protocol import ChatCompletionRequest, Tool
from gateway.structured_output import schema_decoding
from gateway.tool_parsers import PARSERS, Extractor, named_call, required_calls
from ipc.messages import GuidedDecoding


@dataclass(frozen=True)
class ToolOptions:
    """The gateway's tool-calling flags."""

    parser: str | None = None  # --tool-call-parser: hermes, llama3_json, mistral
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice

    def validate(self) -> None:
        if self.parser is not None and self.parser not in PARSERS:
            raise ValueError(
                f"--tool-call-parser must be one of {', '.join(sorted(PARSERS))}, got {self.parser!r}"
            )
        if self.enable_auto_tool_choice and self.parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")


@dataclass
class ToolPlan:
    template_tools: list[dict[str, Any]] | None = None
    guided: GuidedDecoding | None = None
    extract: Extractor | None = None  # None: the output is plain content
    named: bool = False  # tool_choice named a function: finish_reason stays "stop"


def plan_tools(req: ChatCompletionRequest, options: ToolOptions) -> ToolPlan:
    if req.tools == []:
        raise BadRequest(
            "`tools` must not be an empty array. Either provide at least one tool or omit the "
            "field entirely.",
            "tools",
        )
    tools = req.tools or []
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise BadRequest(f"tools[{i}].type must be 'function', got {tool.type!r}", "tools")
    template_tools = [tool_dict(t) for t in tools] or None
    if choice == "none":
        # vLLM still shows the template the tools (a model may be told not to call them).
        return ToolPlan(template_tools)
    if not tools:
        raise BadRequest(f"tool_choice {choice!r} needs tools", "tool_choice")
    if choice == "auto":
        if not (options.enable_auto_tool_choice and options.parser):
            raise BadRequest(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                "to be set on the server",
                "tool_choice",
            )
        return ToolPlan(template_tools, None, PARSERS[options.parser])
    if choice == "required":
        schema = _calls_schema(tools, single=req.parallel_tool_calls is False)
        return ToolPlan(template_tools, schema_decoding(schema), required_calls)
    name = _named_function(choice)
    named = next((t for t in tools if t.function.name == name), None)
    if named is None:
        raise BadRequest(
            f"tool_choice names function {name!r}, which is not in tools", "tool_choice"
        )
    guided = schema_decoding(_parameters(named))
    return ToolPlan(template_tools, guided, named_call(name), named=True)


def _named_function(choice: Any) -> str:
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return str(fn["name"])
    raise BadRequest(
        "tool_choice must be 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": ...}}',
        "tool_choice",
    )


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _calls_schema(tools: list[Tool], single: bool) -> dict[str, Any]:
    """A JSON array of calls, each naming one tool and matching its parameters."""
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": _parameters(t),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
    if single:
        schema["maxItems"] = 1
    return schema


def tool_dict(tool: Tool) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": tool.function.name}
    if tool.function.description is not None:
        fn["description"] = tool.function.description
    fn["parameters"] = _parameters(tool)
    return {"type": "function", "function": fn}
