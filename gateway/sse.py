"""Server-sent events exactly as OpenAI frames them: `data: {json}\\n\\n`, then `data: [DONE]`.

`SSEResponse` streams an async iterator of ready-made events while it listens for the
client's disconnect; on disconnect it closes the iterator at once, so the `finally` blocks
behind it (which abort the request in the worker) run within the same event-loop turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

import msgspec
from starlette.types import Receive, Scope, Send

from gateway.errors import APIError

DONE = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()
T = TypeVar("T")


def event(payload: msgspec.Struct | dict[str, object]) -> bytes:
    """One SSE event carrying `payload` as JSON."""
    return b"data: " + _encoder.encode(payload) + b"\n\n"


def error_event(err: APIError) -> bytes:
    """A mid-stream error: the openai SDK raises APIError when a chunk holds `error`."""
    return event(err.body())


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was complete."""


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(work: Awaitable[T], receive: Receive) -> T:
    """Await `work`, cancelling it if the client disconnects first (non-streaming requests)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientDisconnected()
    return task.result()


class SSEResponse:
    """An ASGI response streaming `events` (each already framed by `event()`)."""

    def __init__(
        self, events: AsyncGenerator[bytes, None], headers: dict[str, str] | None = None
    ) -> None:
        self.events = events
        self.headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                    *self.headers,
                ],
            }
        )
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump
            await self.events.aclose()

    async def _pump(self, send: Send) -> None:
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
