"""Chat templates: Jinja2 rendered the way transformers' `apply_chat_template` renders them.

Same environment as transformers (a sandbox, `trim_blocks`, `lstrip_blocks`, loop controls,
`tojson`, `raise_exception`, `strftime_now`, the `{% generation %}` tag), so a model's
template produces the same prompt here as in Hugging Face code.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat request that cannot be rendered: no template, a template error, bad content."""


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; for inference it renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's Extension API)

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template raised: {message}")


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None
) -> str:
    # transformers' tojson: no HTML escaping (unlike jinja2's built-in), unicode kept.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error (line {e.lineno}): {e}") from e


def flatten_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages whose `content` is a list of text parts get it joined into one string.

    Templates of text models index `message['content']` as a string; OpenAI clients may
    send `[{"type": "text", "text": ...}, ...]`. Parts are joined with newlines, as vLLM does.
    """
    flat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{i}] must be an object")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type", "text") == "text":
                    texts.append(str(part.get("text", "")))
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ChatTemplateError(
                        f"messages[{i}].content[{j}]: content part type {kind!r} is not "
                        "supported (only 'text')"
                    )
            message = {**message, "content": "\n".join(texts)}
        flat.append(message)
    return flat


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    bos_token: str = "",
    eos_token: str = "",
    continue_final_message: bool = False,
    **kwargs: Any,
) -> str:
    """Render `source` for `messages`; extra keyword arguments become template variables.

    With `continue_final_message` the prompt ends right after the last message's text (no
    end-of-turn marker), so the model carries that message on, as transformers does."""
    flat = flatten_content(messages)
    text = _render(source, flat, add_generation_prompt, tools, bos_token, eos_token, **kwargs)
    if continue_final_message:
        text = _open_final_message(text, flat)
    return text


def _open_final_message(text: str, messages: list[dict[str, Any]]) -> str:
    final = messages[-1].get("content") if messages else None
    if not isinstance(final, str):
        raise ChatTemplateError("continue_final_message needs a final message with content")
    for needle in (final, final.strip()):
        at = text.rfind(needle)
        if needle and at >= 0:
            return text[: at + len(needle)]
    raise ChatTemplateError(
        "continue_final_message is set, but the final message's text does not appear in the "
        "rendered prompt (the chat template changes it)"
    )


def _render(
    source: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    bos_token: str,
    eos_token: str,
    **kwargs: Any,
) -> str:
    template = compile_template(source)
    try:
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            bos_token=bos_token,
            eos_token=eos_token,
            **kwargs,
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from e
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
        raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e
