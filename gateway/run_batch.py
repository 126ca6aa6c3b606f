"""The OpenAI batch file format, run offline (`headrace run-batch`: headrace/run_batch_cmd.py).

Each input line: {"custom_id", "method": "POST", "url": "/v1/chat/completions" or
"/v1/completions", "body": {...}}. Each output line, in input order:
{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}, or
"response": null and "error" {"code", "message"} when the line itself is unusable.
Every line runs through the same serving code as the HTTP gateway (no HTTP), all at once:
the worker's scheduler does the batching.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec

from gateway.engine_client import EngineClient
from gateway.errors import APIError, BadRequest, InternalError, from_validation_error
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.serving_chat import create_chat_completion
from gateway.serving_completions import create_completion

ENDPOINTS = {
    "/v1/chat/completions": (ChatCompletionRequest, create_chat_completion),
    "/v1/completions": (CompletionRequest, create_completion),
}


class BatchLine(msgspec.Struct):
    custom_id: str
    url: str
    body: dict[str, Any]
    method: str = "POST"


async def run_line(client: EngineClient, raw: str) -> dict[str, Any]:
    """One batch line -> one output line (never raises)."""
    custom_id: str | None = None
    request_id = f"batch_req_{uuid.uuid4().hex}"
    try:
        line = msgspec.json.decode(raw, type=BatchLine)
        custom_id = line.custom_id
        if line.method != "POST" or line.url not in ENDPOINTS:
            raise BadRequest(f"unsupported method/url {line.method} {line.url}", "url")
        kind, create = ENDPOINTS[line.url]
        body = line.body | {"stream": False}
        try:
            req = msgspec.convert(body, type=kind)
        except msgspec.ValidationError as e:
            raise from_validation_error(e) from None
        result = await create(client, None, req)  # type: ignore[operator]
        status, out = 200, msgspec.to_builtins(result)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        return _line(request_id, custom_id, None, {"code": "invalid_line", "message": str(e)})
    except APIError as e:
        status, out = e.status, msgspec.to_builtins(e.body())
    except Exception as e:  # one bad line must not lose the others
        err = InternalError(f"{type(e).__name__}: {e}")
        status, out = err.status, msgspec.to_builtins(err.body())
    response = {"status_code": status, "request_id": request_id, "body": out}
    return _line(request_id, custom_id, response, None)


def _line(rid: str, custom_id: str | None, response: Any, error: Any) -> dict[str, Any]:
    return {"id": rid, "custom_id": custom_id, "response": response, "error": error}


async def run_batch(client: EngineClient, lines: list[str], output: Path, concurrency: int) -> int:
    """Run all lines; returns how many failed."""
    from tqdm import tqdm

    if not await client.wait_ready(timeout=600):
        raise RuntimeError("the worker did not become ready within 600 s")
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(lines), desc="run-batch", unit="req", file=sys.stderr)

    async def one(raw: str) -> dict[str, Any]:
        async with gate:
            result = await run_line(client, raw)
        bar.update(1)
        return result

    results = await asyncio.gather(*(one(raw) for raw in lines))
    bar.close()
    with output.open("w") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return sum(1 for r in results if r["error"] or r["response"]["status_code"] != 200)
