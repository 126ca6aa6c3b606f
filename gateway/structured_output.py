"""Structured output requests -> one GuidedDecoding for the worker, checked before sending.

The OpenAI fields (`response_format` json_object / json_schema) and vLLM's extras
(`structured_outputs` {json, regex, choice, grammar, json_object}, and the older
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`) all become one grammar
source. Before the request reaches an engine, the source is parsed into an xgrammar
Grammar on a thread (the event loop never waits on it), cached by source: a schema or
grammar that does not parse is a 400 naming the field and xgrammar's reason. The worker
compiles the same source against its vocabulary (see worker/structured.py).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import OrderedDict
from typing import Any

from gateway.errors import BadRequest
from gateway.protocol import SamplingExtras, StructuredOutputs
from ipc.messages import GrammarKind, GuidedDecoding

JSON_OBJECT_SCHEMA = '{"type": "object"}'
_CACHE_SIZE = 1024
_checked: OrderedDict[tuple[GrammarKind, str, bool], str | None] = OrderedDict()


def guided_decoding(req: SamplingExtras) -> tuple[GuidedDecoding, str] | None:
    """The grammar a request asks for and the field that asked; 400 if it asks twice."""
    found: list[tuple[GuidedDecoding, str]] = []
    rf = req.response_format
    if rf is not None and rf.type != "text":
        found.append((_response_format(rf.type, rf.json_schema), "response_format"))
    if req.guided_json is not None:
        found.append((_schema(req.guided_json, "guided_json"), "guided_json"))
    if req.guided_regex is not None:
        if not req.guided_regex:
            raise BadRequest("guided_regex must not be empty", "guided_regex")
        found.append((GuidedDecoding(GrammarKind.REGEX, req.guided_regex), "guided_regex"))
    if req.guided_choice is not None:
        found.append((_choice(req.guided_choice), "guided_choice"))
    if req.guided_grammar is not None:
        if not req.guided_grammar.strip():
            raise BadRequest("guided_grammar must not be empty", "guided_grammar")
        found.append((GuidedDecoding(GrammarKind.EBNF, req.guided_grammar), "guided_grammar"))
    if req.structured_outputs is not None:
        found += _structured_outputs(req.structured_outputs)
    if len(found) > 1:
        fields = ", ".join(f for _, f in found)
        raise BadRequest(
            f"only one kind of structured output per request, got {fields}", found[1][1]
        )
    return found[0] if found else None


def _structured_outputs(so: StructuredOutputs) -> list[tuple[GuidedDecoding, str]]:
    field = "structured_outputs"
    if so.structural_tag is not None:
        raise BadRequest("structured_outputs.structural_tag is not supported", field)
    found = []
    if so.json is not None:
        found.append(_schema(so.json, field))
    if so.json_object:
        found.append(GuidedDecoding(GrammarKind.JSON_SCHEMA, JSON_OBJECT_SCHEMA))
    if so.regex is not None:
        if not so.regex:
            raise BadRequest("structured_outputs.regex must not be empty", field)
        found.append(GuidedDecoding(GrammarKind.REGEX, so.regex))
    if so.choice is not None:
        found.append(_choice(so.choice, field))
    if so.grammar is not None:
        if not so.grammar.strip():
            raise BadRequest("structured_outputs.grammar must not be empty", field)
        found.append(GuidedDecoding(GrammarKind.EBNF, so.grammar))
    return [(g, field) for g in found]


def _response_format(kind: str, json_schema: Any) -> GuidedDecoding:
    if kind == "json_object":
        return GuidedDecoding(GrammarKind.JSON_SCHEMA, JSON_OBJECT_SCHEMA)
    if kind != "json_schema":
        raise BadRequest(
            f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
            "response_format",
        )
    if json_schema is None or json_schema.schema_ is None:
        raise BadRequest("response_format json_schema needs json_schema.schema", "response_format")
    return _schema(json_schema.schema_, "response_format")


def _schema(schema: Any, field: str) -> GuidedDecoding:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise BadRequest(f"{field} is not valid JSON: {e}", field) from None
    if not isinstance(schema, dict | bool):
        raise BadRequest(f"{field} must be a JSON schema (an object)", field)
    return GuidedDecoding(GrammarKind.JSON_SCHEMA, json.dumps(schema, ensure_ascii=False))


def schema_decoding(schema: dict[str, Any]) -> GuidedDecoding:
    """A JSON schema we built ourselves (tool calling)."""
    return GuidedDecoding(GrammarKind.JSON_SCHEMA, json.dumps(schema, ensure_ascii=False))


def _choice(choices: list[str], field: str = "guided_choice") -> GuidedDecoding:
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise BadRequest(f"{field} choices must be a non-empty list of non-empty strings", field)
    # EBNF string literals take JSON's escapes.
    alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
    return GuidedDecoding(GrammarKind.EBNF, f"root ::= {alternatives}")


async def checked_guided_decoding(
    req: SamplingExtras, forced: GuidedDecoding | None = None
) -> GuidedDecoding | None:
    """The request's grammar, parsed once (400s here); `forced` comes from tool_choice."""
    found = guided_decoding(req)
    if forced is not None:
        if found is not None:
            raise BadRequest(
                f"{found[1]} cannot be combined with tool_choice 'required' or a named "
                "function (which constrain the output themselves)",
                found[1],
            )
        found = (forced, "tool_choice")
    if found is None:
        return None
    await check(*found)
    return found[0]


async def check(spec: GuidedDecoding, field: str) -> None:
    """400 naming `field` if the grammar does not parse (cached; parsed off the loop)."""
    key = (spec.kind, spec.source, spec.any_whitespace)
    if key in _checked:
        _checked.move_to_end(key)
        error = _checked[key]
    else:
        error = await asyncio.to_thread(parse_error, spec)
        _checked[key] = error
        while len(_checked) > _CACHE_SIZE:
            _checked.popitem(last=False)
    if error is not None:
        raise BadRequest(f"invalid {field}: {error}", field)


def parse_error(spec: GuidedDecoding) -> str | None:
    """Why xgrammar cannot parse this grammar, or None if it can."""
    import xgrammar as xgr

    try:
        if spec.kind == GrammarKind.JSON_SCHEMA:
            xgr.Grammar.from_json_schema(
                spec.source, any_whitespace=spec.any_whitespace, strict_mode=True
            )
        elif spec.kind == GrammarKind.REGEX:
            xgr.Grammar.from_regex(spec.source)
        else:
            xgr.Grammar.from_ebnf(spec.source)
    except Exception as e:  # xgrammar raises RuntimeError (and ValueError for bad JSON)
        text = str(e).strip() or type(e).__name__
        return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text).strip()
    return None
