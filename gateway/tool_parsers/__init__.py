"""Tool-call parsers: the model's text -> OpenAI tool calls, whole or streamed."""

from gateway.tool_parsers.base import (
    Extraction,
    Extractor,
    PartialCall,
    ToolCallStream,
    parse_complete,
)
from gateway.tool_parsers.formats import PARSERS, named_call, required_calls

__all__ = [
    "PARSERS",
    "Extraction",
    "Extractor",
    "PartialCall",
    "ToolCallStream",
    "named_call",
    "parse_complete",
    "required_calls",
]
