"""What one HTTP request may cost the gateway before it is a request: body size, time to
send headers and body, and quiet handling of clients that leave halfway.

`BodyGuard` (ASGI middleware) reads every request body itself, before any route sees it:

    Content-Length > limit           -> 413 at once, the body is never read
    chunked body growing past limit  -> 413 as soon as it does
    body not complete in time        -> 408
    client gone mid-body             -> one DEBUG line, no response, no traceback

then replays the body to the app in one message, so `await request.body()` is a copy of
bytes already here. `HeaderTimeoutH11` (a uvicorn protocol) closes connections whose
request line and headers do not arrive in time; uvicorn itself has no such timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass, fields

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.errors import APIError

logger = logging.getLogger("headrace.gateway")

DEFAULT_MAX_BODY = 4 << 20  # 4 MiB: far beyond any prompt that fits a context window


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request limits of the HTTP server (all flags of `headrace gateway` / `serve`)."""

    max_request_body_bytes: int = DEFAULT_MAX_BODY  # 413 beyond this
    request_body_timeout: float = 30.0  # seconds for the whole body once headers are in
    request_header_timeout: float = 10.0  # seconds for the request line and headers
    timeout_keep_alive: float = 5.0  # idle seconds before a keep-alive connection is closed
    h11_max_incomplete_event_size: int = 64 << 10  # bytes of unfinished headers at most

    def validate(self) -> None:
        if self.max_request_body_bytes < 1:
            raise ValueError(
                f"--max-request-body-bytes must be >= 1, got {self.max_request_body_bytes}"
            )
        for name in ("request_body_timeout", "request_header_timeout", "timeout_keep_alive"):
            if getattr(self, name) <= 0:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be > 0, got {getattr(self, name)}")
        if self.h11_max_incomplete_event_size < 1024:
            raise ValueError(
                "--h11-max-incomplete-event-size must be >= 1024, got "
                f"{self.h11_max_incomplete_event_size}"
            )


# Each field's flag is its name in kebab case; the help ends with the default.
_HELP = {
    "max_request_body_bytes": "413 for bodies larger than this",
    "request_body_timeout": "408 when a body takes longer than this many seconds",
    "request_header_timeout": "close connections whose headers take longer than this many seconds",
    "timeout_keep_alive": "close idle keep-alive connections after this many seconds",
    "h11_max_incomplete_event_size": "largest request line plus headers, in bytes",
}


def add_limit_args(g: argparse._ArgumentGroup) -> None:
    for f in fields(LimitsConfig):
        default = f.default
        g.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"{_HELP[f.name]} (default {default})",
        )


def limits_from_args(args: argparse.Namespace) -> LimitsConfig:
    limits = LimitsConfig(**{f.name: getattr(args, f.name) for f in fields(LimitsConfig)})
    limits.validate()
    return limits


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"


class RequestTimeout(APIError):
    status = 408
    type = "invalid_request_error"


class _Gone(Exception):
    """The client disconnected before its body was complete."""


class BodyGuard:
    """Read each body under the limits, then hand the app a replaying `receive`."""

    def __init__(self, app: ASGIApp, limits: LimitsConfig) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_request_body_bytes
        length = _content_length(scope)
        if length is not None and length > limit:
            too_large = PayloadTooLarge(
                f"the request body has {length} bytes; this server takes at most {limit} "
                "(--max-request-body-bytes)"
            )
            await _send_error(send, too_large, close=True)
            return
        try:
            body = await asyncio.wait_for(
                self._read(receive, limit), self.limits.request_body_timeout
            )
        except _Gone:
            logger.debug("client left while sending the body of %s", scope["path"])
            return
        except TimeoutError:
            timeout = RequestTimeout(
                f"the request body did not arrive within {self.limits.request_body_timeout} s "
                "(--request-body-timeout)"
            )
            await _send_error(send, timeout, close=True)
            return
        except PayloadTooLarge as err:
            await _send_error(send, err, close=True)
            return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    async def _read(receive: Receive, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"the request body exceeds {limit} bytes (--max-request-body-bytes)"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as before

    return replay


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Send, err: APIError, close: bool = False) -> None:
    import msgspec

    body = msgspec.json.encode(err.body())  # the same OpenAI error object routes send
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if close:  # the unread body (or a slow client) must not hold the connection
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request line and headers do not
    complete within `header_timeout` seconds (set by `run_gateway`), whether they are a
    connection's first request or a later one on a keep-alive connection."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self._between_requests():
            self._arm()
        super().data_received(data)
        if self._header_timer is not None and not self._between_requests():
            self._header_timer.cancel()  # headers complete: the body has its own timeout
            self._header_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _expire(self) -> None:
        self._header_timer = None
        if self._between_requests() and not self.transport.is_closing():
            logger.debug("closing a connection whose headers did not arrive in time")
            self.transport.close()
