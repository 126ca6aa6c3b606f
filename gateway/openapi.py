"""GET /openapi.json: the API's OpenAPI 3.1 document, generated from the msgspec Structs
the routes decode and encode (so it cannot drift from what the server accepts)."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from gateway.errors import ErrorResponse
from gateway.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

REF = "#/components/schemas/{name}"

# (path, method, summary, request Struct or None, response Struct, streams SSE)
OPERATIONS: list[tuple[str, str, str, type | None, type, bool]] = [
    ("/v1/completions", "post", "Create a completion", CompletionRequest, CompletionResponse, True),
    ("/v1/chat/completions", "post", "Create a chat completion", ChatCompletionRequest,
     ChatCompletionResponse, True),
    ("/v1/models", "get", "List the served models", None, ModelList, False),
    ("/v1/models/{model}", "get", "Retrieve one model", None, ModelCard, False),
    ("/tokenize", "post", "Tokenize a prompt or chat", TokenizeRequest, TokenizeResponse, False),
    ("/detokenize", "post", "Token ids to text", DetokenizeRequest, DetokenizeResponse, False),
]  # fmt: skip

ERRORS = {
    "400": "invalid request",
    "401": "missing or wrong API key",
    "404": "unknown model or route",
    "408": "the body did not arrive in time",
    "413": "body larger than --max-request-body-bytes",
    "429": "overloaded: retry after the Retry-After header's seconds",
    "503": "no worker available, or draining for shutdown",
}


@functools.cache
def openapi_document(version: str = "0.1.0") -> dict[str, Any]:
    structs: list[Any] = [ErrorResponse]
    for *_, req, resp, _stream in OPERATIONS:
        structs += [s for s in (req, resp) if s is not None]
    schemas, components = msgspec.json.schema_components(structs, ref_template=REF)
    refs = {s: schema for s, schema in zip(structs, schemas, strict=True)}
    paths: dict[str, dict[str, Any]] = {}
    for path, method, summary, req, resp, stream in OPERATIONS:
        content: dict[str, Any] = {"application/json": {"schema": refs[resp]}}
        if stream:
            content["text/event-stream"] = {
                "schema": {"type": "string", "description": "SSE chunks when stream is true"}
            }
        responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
        for code, why in ERRORS.items():
            error = {"application/json": {"schema": refs[ErrorResponse]}}
            responses[code] = {"description": why, "content": error}
        op: dict[str, Any] = {"summary": summary, "responses": responses}
        if req is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[req]}},
            }
        if "{model}" in path:
            op["parameters"] = [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "headrace", "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }
