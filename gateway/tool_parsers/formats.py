"""The tool-call formats of the models we serve, as vLLM's `--tool-call-parser` names them.

    hermes       Hermes 2/3, Qwen2.5:  text <tool_call>{"name": f, "arguments": {...}}</tool_call>...
    llama3_json  Llama 3.1/3.2:        [<|python_tag|>]{"name": f, "parameters": {...}}; {...}
    mistral      Mistral:              text [TOOL_CALLS][{"name": f, "arguments": {...}}, ...]
                                       (or, newer tokenizers, [TOOL_CALLS]f[ARGS]{...})

and the two outputs that structured output forces (tool_choice required: a JSON array of
{"name", "parameters"}; a named function: its arguments object alone).
"""

from __future__ import annotations

from gateway.tool_parsers.base import (
    Extraction,
    Extractor,
    PartialCall,
    call_from_object,
    calls_in_array,
    held_back,
)
from gateway.tool_parsers.json_scan import scan_object, skip_ws

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"


def _content_before(text: str, marker: str, final: bool) -> tuple[str, int]:
    """Content up to the first marker (holding back a partial one), and where it is (-1)."""
    k = text.find(marker)
    if k >= 0:
        return text[:k], k
    return (text if final else text[: len(text) - held_back(text, marker)]), -1


def hermes(text: str, final: bool) -> Extraction:
    content, k = _content_before(text, HERMES_START, final)
    out = Extraction(content)
    while k >= 0:
        j = skip_ws(text, k + len(HERMES_START))
        if j == len(text) or text[j] != "{":
            break
        scan = scan_object(text, j)
        out.calls.append(call_from_object(text, scan, ("arguments", "parameters")))
        if scan.end is None:
            break
        k = text.find(HERMES_START, scan.end)
    return out


def llama3_json(text: str, final: bool) -> Extraction:
    j = skip_ws(text, 0)
    if text.startswith(PYTHON_TAG, j):
        j = skip_ws(text, j + len(PYTHON_TAG))
    elif not final and PYTHON_TAG.startswith(text[j:]):
        return Extraction()  # blank so far, or a partial tag: undecided
    if j < len(text) and text[j] != "{":
        return Extraction(text)  # plain text
    calls: list[PartialCall] = []
    while j < len(text) and text[j] == "{":
        scan = scan_object(text, j)
        call = call_from_object(text, scan, ("parameters", "arguments"))
        if scan.end is not None and call.name is None:
            break  # a JSON object that is not a call: the answer itself
        calls.append(call)
        if scan.end is None:
            break
        j = skip_ws(text, scan.end)
        if j < len(text) and text[j] == ";":
            j = skip_ws(text, j + 1)
    if any(c.name is not None for c in calls):
        return Extraction("", calls)
    return Extraction(text if final else "")


def mistral(text: str, final: bool) -> Extraction:
    if MISTRAL_CALLS not in text:
        bare = _bare_call_array(text, final)
        if bare is not None:
            return bare
    content, k = _content_before(text, MISTRAL_CALLS, final)
    out = Extraction(content)
    while k >= 0:
        j = skip_ws(text, k + len(MISTRAL_CALLS))
        if j == len(text):
            break
        if text[j] == "[":
            out.calls.extend(calls_in_array(text, j, ("arguments", "parameters")))
            break
        a = text.find(MISTRAL_ARGS, j)  # name[ARGS]{...}
        if a < 0:
            break
        name = text[j:a].strip()
        o = skip_ws(text, a + len(MISTRAL_ARGS))
        if o == len(text) or text[o] != "{":
            out.calls.append(PartialCall(name))
            break
        scan = scan_object(text, o)
        end = scan.end if scan.end is not None else len(text)
        out.calls.append(PartialCall(name, text[o:end]))
        if scan.end is None:
            break
        k = text.find(MISTRAL_CALLS, scan.end)
    return out


def _bare_call_array(text: str, final: bool) -> Extraction | None:
    """[TOOL_CALLS] is a special token: skipped in the text (skip_special_tokens), the
    output starts with the calls' array itself. None when the text is not one."""
    j = skip_ws(text, 0)
    if j == len(text) or text[j] != "[":
        return None
    k = skip_ws(text, j + 1)
    if k < len(text) and text[k] != "{":
        return None  # "[1] ..." is text
    calls = calls_in_array(text, j, ("arguments", "parameters"))
    if any(c.name is not None for c in calls):
        return Extraction("", calls)
    # Undecided until a call is named; finished without one, it was plain text.
    return None if final else Extraction("")


def required_calls(text: str, final: bool) -> Extraction:
    """tool_choice "required": the output is a JSON array of {"name", "parameters"}."""
    j = skip_ws(text, 0)
    if j == len(text) or text[j] != "[":
        return Extraction(text if final else "")
    return Extraction("", calls_in_array(text, j, ("parameters", "arguments")))


def named_call(name: str) -> Extractor:
    """tool_choice naming a function: the output is its arguments object."""

    def extract(text: str, final: bool) -> Extraction:
        return Extraction("", [PartialCall(name, text.lstrip())])

    return extract


PARSERS: dict[str, Extractor] = {"hermes": hermes, "llama3_json": llama3_json, "mistral": mistral}
