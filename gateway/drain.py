"""Graceful drain: on SIGTERM (or SIGINT) the gateway stops taking requests, answering
503 with a clear message (so load balancers and clients move on), lets the requests in
flight finish for up to `--shutdown-timeout` seconds, then exits. A second signal exits
at once.

    SIGTERM --> draining: new requests 503, /health 503, streams in flight continue
            --> in flight == 0 or shutdown_timeout passed --> uvicorn shuts down
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import ServiceUnavailable

logger = logging.getLogger("headrace.gateway")

DEFAULT_SHUTDOWN_TIMEOUT = 30.0


class DrainState:
    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0  # HTTP requests whose response is not complete


class DrainMiddleware:
    """Counts requests in flight; 503 for new ones once draining."""

    def __init__(self, app: ASGIApp, state: DrainState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            from gateway.app import error_response

            err = ServiceUnavailable("the server is shutting down; retry on another replica")
            response = error_response(err)
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        self.state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.inflight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains before shutting down."""

    def __init__(self, config: uvicorn.Config, state: DrainState, timeout: float) -> None:
        super().__init__(config)
        self.drain_state = state
        self.drain_timeout = timeout
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_state.draining or self._drain_task is not None:
            super().handle_exit(sig, frame)  # second signal: now
            return
        self.drain_state.draining = True
        logger.warning(
            "draining: %d requests in flight, up to %.0f s (--shutdown-timeout)",
            self.drain_state.inflight,
            self.drain_timeout,
        )
        self._drain_task = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.drain_state.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.drain_state.inflight:
            logger.warning("shutdown timeout: cutting %d requests", self.drain_state.inflight)
        self.should_exit = True
