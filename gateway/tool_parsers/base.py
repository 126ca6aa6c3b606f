"""What every tool-call parser produces, and the streaming diff built on it.

A parser is one function: `extract(text, final) -> Extraction`, the content and the calls
in the model's output so far. It must be prefix-stable: as text grows, the content and each
call's arguments only grow (a parser holds back what it cannot decide yet, such as a
partial `<tool_call>` marker). Streaming then needs no per-format code: `ToolCallStream`
re-extracts after each delta and sends what is new, so the streamed pieces always add up to
what a non-streamed request returns.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from gateway.tool_parsers.json_scan import ObjectScan, scan_object, skip_ws


@dataclass
class PartialCall:
    name: str | None  # None until the name is complete
    arguments: str = ""  # the arguments' JSON text as written so far


@dataclass
class Extraction:
    content: str = ""
    calls: list[PartialCall] = field(default_factory=list)


Extractor = Callable[[str, bool], Extraction]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def held_back(text: str, marker: str) -> int:
    """How many trailing characters of text could be the start of `marker`."""
    for m in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:m]):
            return m
    return 0


def call_from_object(text: str, scan: ObjectScan, arg_keys: Sequence[str]) -> PartialCall:
    """{"name": ..., "arguments" | "parameters": {...}} -> a call; a finished object without
    arguments called the function with none."""
    args = next((a for a in (scan.raw(text, k) for k in arg_keys) if a is not None), None)
    if args is None:
        args = "{}" if scan.end is not None else ""
    return PartialCall(scan.string(text, "name"), args)


def calls_in_array(text: str, i: int, arg_keys: Sequence[str]) -> list[PartialCall]:
    """text[i] == '[': the call objects of a JSON array so far."""
    calls: list[PartialCall] = []
    pos = skip_ws(text, i + 1)
    while pos < len(text) and text[pos] == "{":
        scan = scan_object(text, pos)
        calls.append(call_from_object(text, scan, arg_keys))
        if scan.end is None:
            break
        pos = skip_ws(text, scan.end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(text, pos + 1)
        else:
            break
    return calls


def safe_extract(extract: Extractor, text: str, final: bool) -> Extraction:
    """Malformed output is content, not an error: the client still gets the text."""
    try:
        return extract(text, final)
    except ValueError:
        return Extraction(content=text if final else "")


def parse_complete(extract: Extractor, text: str) -> tuple[str | None, list[ToolCall]]:
    """A finished output -> (content or None, its tool calls)."""
    ex = safe_extract(extract, text, True)
    calls = [
        ToolCall(new_call_id(), FunctionCall(c.name, c.arguments))
        for c in ex.calls
        if c.name is not None
    ]
    if calls:
        return (ex.content if ex.content.strip() else None), calls
    return ex.content, calls


class ToolCallStream:
    """One choice's streamed output -> content deltas and `delta.tool_calls` pieces."""

    def __init__(self, extract: Extractor) -> None:
        self.extract = extract
        self.text = ""
        self.sent_content = ""
        self.sent_args: list[str] = []  # per call already announced: arguments sent
        self.num_calls = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[DeltaToolCall]]:
        self.text += delta
        ex = safe_extract(self.extract, self.text, final)
        content = ""
        if ex.content.startswith(self.sent_content):  # never unsay what was sent
            content = ex.content[len(self.sent_content) :]
            self.sent_content = ex.content
        pieces: list[DeltaToolCall] = []
        for i, call in enumerate(ex.calls):
            if call.name is None:
                break  # later calls wait: each call's first piece names it
            if i == len(self.sent_args):
                fn = DeltaFunctionCall(name=call.name, arguments=call.arguments)
                pieces.append(DeltaToolCall(i, new_call_id(), "function", fn))
                self.sent_args.append(call.arguments)
                continue
            sent = self.sent_args[i]
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                new = call.arguments[len(sent) :]
                pieces.append(DeltaToolCall(i, function=DeltaFunctionCall(arguments=new)))
                self.sent_args[i] = call.arguments
        return content, pieces

    @property
    def called(self) -> bool:
        return bool(self.sent_args)
