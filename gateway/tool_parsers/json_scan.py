"""Scanning JSON that is still being written: where values start and (if yet) end.

Tool calls stream in token by token; a parser must know, at any prefix, which call it is
in, whether its name is complete, and which characters belong to its arguments. These
functions read raw text without decoding it (the arguments are passed on as written);
`None` as an end means the text stops inside the value. Malformed JSON raises ValueError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

_WS = " \t\r\n"
_LITERAL = set("-+.0123456789eEtruefalsn")


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def scan_string(text: str, i: int) -> int | None:
    """text[i] == '"': the index after the closing quote, or None if the text ends first."""
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return None


def scan_value(text: str, i: int) -> int | None:
    """The index after the JSON value starting at text[i] (not whitespace), or None."""
    c = text[i]
    if c == '"':
        return scan_string(text, i)
    if c in "{[":
        stack = [c]
        j = i + 1
        while j < len(text):
            c = text[j]
            if c == '"':
                end = scan_string(text, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                stack.append(c)
            elif c in "}]":
                if stack.pop() != ("{" if c == "}" else "["):
                    raise ValueError(f"mismatched {c!r} at {j}")
                if not stack:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] in _LITERAL:
        j += 1
    if j == i:
        raise ValueError(f"unexpected {c!r} at {i}")
    return None if j == len(text) else j  # a literal at the very end may go on


@dataclass
class ObjectScan:
    """An object's top-level keys -> (value start, value end or None), and its end."""

    fields: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None  # index after the closing brace

    def string(self, text: str, key: str) -> str | None:
        """A complete string value, decoded; None if absent, unfinished or not a string."""
        span = self.fields.get(key)
        if span is None or span[1] is None or text[span[0]] != '"':
            return None
        value = json.loads(text[span[0] : span[1]])
        return value if isinstance(value, str) else None

    def raw(self, text: str, key: str) -> str | None:
        """A value's text as written so far; None if the key has not appeared."""
        span = self.fields.get(key)
        if span is None:
            return None
        return text[span[0] : span[1]] if span[1] is not None else text[span[0] :]


def scan_object(text: str, i: int) -> ObjectScan:
    """text[i] == '{': its keys and value spans so far."""
    out = ObjectScan()
    j = skip_ws(text, i + 1)
    while j < len(text):
        if text[j] == "}":
            out.end = j + 1
            return out
        if text[j] != '"':
            raise ValueError(f"expected a key at {j}")
        key_end = scan_string(text, j)
        if key_end is None:
            return out
        key = json.loads(text[j:key_end])
        j = skip_ws(text, key_end)
        if j == len(text):
            return out
        if text[j] != ":":
            raise ValueError(f"expected ':' at {j}")
        j = skip_ws(text, j + 1)
        if j == len(text):
            return out
        end = scan_value(text, j)
        out.fields[key] = (j, end)
        if end is None:
            return out
        j = skip_ws(text, end)
        if j < len(text) and text[j] == ",":
            j = skip_ws(text, j + 1)
        elif j < len(text) and text[j] != "}":
            raise ValueError(f"expected ',' or '}}' at {j}")
    return out
