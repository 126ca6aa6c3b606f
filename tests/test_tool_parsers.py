"""Tool-call parsers on recorded outputs of each format, whole and streamed in every split."""

from __future__ import annotations

import itertools
import json

import pytest

from gateway.tool_parsers import PARSERS, ToolCallStream, named_call, parse_complete, required_calls
from gateway.tool_parsers.json_scan import scan_object, scan_value

WEATHER = {"city": "Paris", "unit": "celsius"}

# (parser, model output, expected content, expected [(name, arguments)])
RECORDED = [
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        "Let me check.\n",
        [("get_weather", WEATHER), ("get_time", {"tz": "Europe/Paris"})],
    ),
    ("hermes", "The answer is 4 < 5.", "The answer is 4 < 5.", []),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {"tz": "UTC \\"Z\\" {x}"}}',
        None,
        [("get_weather", WEATHER), ("get_time", {"tz": 'UTC "Z" {x}'})],
    ),
    ("llama3_json", "Paris is the capital of France.", "Paris is the capital of France.", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "get_time", "arguments": {}}]',
        None,
        [("get_weather", WEATHER), ("get_time", {})],
    ),
    (
        "mistral",
        'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}',
        "Sure. ",
        [("get_weather", WEATHER)],
    ),
    ("mistral", "No tools [needed] here.", "No tools [needed] here.", []),
    (  # [TOOL_CALLS] skipped as a special token
        "mistral",
        '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
        None,
        [("get_weather", WEATHER)],
    ),
    ("mistral", "[1] A list, not calls.", "[1] A list, not calls.", []),
]


def _streamed(extract, text: str, cuts: list[int]):
    stream = ToolCallStream(extract)
    content = ""
    calls: dict[int, dict] = {}
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    for i, piece in enumerate(pieces):
        c, deltas = stream.feed(piece, final=i == len(pieces) - 1)
        content += c
        for d in deltas:
            if d.id is not None:
                assert d.index not in calls and d.index == len(calls)  # announced once, in order
                assert d.type == "function" and d.function.name
                calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize(("parser", "text", "content", "expected"), RECORDED)
def test_recorded_outputs_whole(parser, text, content, expected):
    got_content, calls = parse_complete(PARSERS[parser], text)
    assert got_content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == expected
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)


@pytest.mark.parametrize(("parser", "text", "content", "expected"), RECORDED)
def test_recorded_outputs_streamed_at_every_split(parser, text, content, expected):
    whole_content, whole_calls = parse_complete(PARSERS[parser], text)
    want = [{"name": c.function.name, "arguments": c.function.arguments} for c in whole_calls]
    for cut in range(len(text) + 1):  # two pieces split at every character boundary
        got_content, got_calls = _streamed(PARSERS[parser], text, [cut])
        assert got_calls == want, cut
        assert got_content == (whole_content or ""), cut
    # and one character at a time
    got_content, got_calls = _streamed(PARSERS[parser], text, list(range(1, len(text))))
    assert got_calls == want
    assert got_content == (whole_content or "")


def test_streamed_arguments_arrive_incrementally():
    text = RECORDED[0][1]
    stream = ToolCallStream(PARSERS["hermes"])
    pieces = []
    for ch in text:
        _, deltas = stream.feed(ch)
        pieces += [d.function.arguments for d in deltas if d.id is None]
    assert len(pieces) > 10  # the arguments came a few characters at a time
    assert "<tool" not in "".join(pieces)


def test_partial_marker_is_held_back_until_decided():
    stream = ToolCallStream(PARSERS["hermes"])
    assert stream.feed("Hi <tool")[0] == "Hi "
    assert stream.feed("box>")[0] == "<toolbox>"  # not a marker after all


def test_required_and_named_outputs():
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
    content, calls = parse_complete(required_calls, text)
    assert content is None
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    for cut in range(len(text) + 1):
        assert _streamed(required_calls, text, [cut])[1] == [
            {"name": c.function.name, "arguments": c.function.arguments} for c in calls
        ]
    content, calls = parse_complete(named_call("get_weather"), '{"city": "Paris"}')
    assert content is None and calls[0].function.arguments == '{"city": "Paris"}'


def test_malformed_tool_json_is_content_not_an_error():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1]}\n</tool_call>'
    content, calls = parse_complete(PARSERS["hermes"], text)
    assert calls == [] and content == text


def test_json_scan_handles_escapes_and_nesting():
    text = '{"a": "x\\"}y", "b": [1, {"c": "]"}], "d": 2}'
    scan = scan_object(text, 0)
    assert scan.end == len(text)
    assert scan.raw(text, "b") == '[1, {"c": "]"}]'
    assert scan.string(text, "a") == 'x"}y'
    assert scan_value('{"a": [1, 2', 0) is None
    with pytest.raises(ValueError):
        scan_value('{"a": [1}', 0)
