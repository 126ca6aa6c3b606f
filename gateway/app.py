"""The gateway's HTTP app (starlette); `headrace gateway` (headrace/gateway_cmd.py) serves it.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{model}],
GET /health, GET /metrics, POST /tokenize, POST /detokenize, GET /openapi.json,
/admin/workers (gateway/admin.py), and the chat page at GET /. With `--api-key`, /v1/* and
/admin/* need `Authorization: Bearer KEY`. Every user error is an OpenAI error object.
Completions name the worker(s) that served them in an `X-Headrace-Worker` header (worker
ids), streamed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.admin import admin_routes, worker_row
from gateway.cors import CorsConfig, add_cors
from gateway.decode import decode_body, offload
from gateway.drain import DEFAULT_SHUTDOWN_TIMEOUT, DrainMiddleware, DrainState
from gateway.engine_client import EngineClient, ModelEntry
from gateway.errors import (
    APIError,
    BadRequest,
    InternalError,
    NotFound,
    TooManyRequests,
    Unauthorized,
)
from gateway.limits import BodyGuard, LimitsConfig
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.openapi import openapi_document
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from gateway.route_note import SESSION_HEADER, RouteNote, noting, session_key
from gateway.serving_chat import (
    chat_chars,
    chat_prompt_ids,
    create_chat_completion,
    generation_prompt,
)
from gateway.serving_completions import create_completion
from gateway.sse import ClientDisconnected, SSEResponse, until_disconnect
from gateway.tool_calling import ToolOptions, tool_dict
from gateway.workers_file import WorkersFileWatcher

logger = logging.getLogger("headrace.gateway")
_json = msgspec.json.Encoder()


@dataclass
class GatewayConfig:
    """Everything `headrace gateway` is told besides the engine's own flags."""

    workers: list[str]  # ZeroMQ addresses of the workers
    workers_file: str | None = None  # more addresses, re-read when the file changes
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required as a Bearer token on /v1/* when set
    routing: str = "least-loaded"  # or "prefix" or "session"
    max_queued_requests: int | None = None  # 429 beyond this many requests waiting
    worker_timeout: float = 1.0  # seconds of silence before a worker counts as down
    tokenizer: str | None = None  # overrides the tokenizer path the workers announce
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # body size, HTTP timeouts
    cors: CorsConfig = field(default_factory=CorsConfig)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT  # drain seconds after SIGTERM
    tools: ToolOptions = field(default_factory=ToolOptions)  # tool-call parser flags
    chat_page: bool = True  # the built-in chat page at / (gateway/chat_page.py)
    started: float = field(default_factory=time.time)


def json_response(body: msgspec.Struct | dict[str, Any], status: int = 200) -> Response:
    return Response(_json.encode(body), status_code=status, media_type="application/json")


def error_response(err: APIError) -> Response:
    response = json_response(err.body(), err.status)
    if isinstance(err, TooManyRequests):
        response.headers["retry-after"] = str(err.retry_after)
    return response


class APIKeyMiddleware:
    """401 on /v1/* without the right `Authorization: Bearer` token."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(("/v1/", "/admin/")):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                err = Unauthorized("invalid or missing API key (Authorization: Bearer ...)")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(config: GatewayConfig, client: EngineClient | None = None) -> Starlette:
    """The ASGI app; it starts and stops its EngineClient with its lifespan."""
    watcher = None
    if config.workers_file:
        watcher = WorkersFileWatcher(config.workers_file, keep=config.workers)
    client = client or EngineClient(
        [*config.workers, *(watcher.current if watcher else [])],
        routing=config.routing,
        worker_timeout=config.worker_timeout,
        tokenizer=config.tokenizer,
        max_queued_requests=config.max_queued_requests,
    )
    routes = [
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint(model_card), methods=["GET"]),
        Route("/openapi.json", endpoint(openapi), methods=["GET"]),
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/metrics", endpoint(metrics_endpoint), methods=["GET"]),
        Route("/tokenize", endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize), methods=["POST"]),
        *admin_routes(client, config.api_key, endpoint, json_response),
    ]
    if config.chat_page:
        from gateway.chat_page import chat_page_routes

        routes += chat_page_routes()
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={404: http_error, 405: http_error}
    )
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(BodyGuard, limits=config.limits)
    add_cors(app, config.cors)  # outermost but for drain: preflights need no key or body
    app.state.drain = DrainState()
    app.add_middleware(DrainMiddleware, state=app.state.drain)
    app.state.config = config
    app.state.watcher = watcher
    app.state.client = client
    app.state.metrics = Metrics(client)
    return app


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    client: EngineClient = app.state.client
    watcher: WorkersFileWatcher | None = app.state.watcher
    await client.start()
    watching = None
    if watcher is not None:
        watching = asyncio.ensure_future(watcher.run(client))
    try:
        yield
    finally:
        if watching is not None:
            watching.cancel()
        await client.close()


def endpoint(
    handler: Callable[[Request], Awaitable[Response | SSEResponse]],
) -> Callable[[Request], Awaitable[Any]]:
    """`handler` with every error it raises answered as an OpenAI error object."""

    async def wrapped(request: Request) -> Any:
        try:
            return await handler(request)
        except APIError as e:
            return error_response(e)
        except (ClientDisconnected, ClientDisconnect):
            logger.debug("client disconnected from %s", request.url.path)
            return Response(status_code=499)
        except Exception:
            logger.exception("unexpected error in %s", request.url.path)
            return error_response(InternalError("internal server error"))

    return wrapped


async def http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    err = NotFound(f"no route {request.url.path}") if status == 404 else BadRequest(str(exc))
    err.status = status
    return error_response(err)


# -------------------------------------------------------------------- routes


async def generate(request: Request, kind: type[Any], create: Callable[..., Any]) -> Any:
    """A completion or chat completion: a JSON response, or an SSE stream; both say which
    worker served it (gateway/route_note.py)."""
    req = await decode_body(await request.body(), kind)
    state = request.app.state
    note = RouteNote(session_key(request.headers.get(SESSION_HEADER), req.user))
    try:
        with noting(note):
            run = create(state.client, state.metrics, req)
            result = await until_disconnect(run, request.receive)
    except APIError as e:  # failed after routing (a lost worker): still say which one
        response = error_response(e)
        response.headers.update(note.headers())
        return response
    if isinstance(result, AsyncGenerator):
        return SSEResponse(result, note.headers())
    response = json_response(result)
    response.headers.update(note.headers())
    return response


async def completions(request: Request) -> Any:
    return await generate(request, CompletionRequest, create_completion)


async def chat(request: Request) -> Any:
    config: GatewayConfig = request.app.state.config
    create = functools.partial(create_chat_completion, tool_options=config.tools)
    return await generate(request, ChatCompletionRequest, create)


def _card(config: GatewayConfig, entry: ModelEntry) -> ModelCard:
    info = entry.info
    return ModelCard(entry.name, int(config.started), info.model_path, info.max_model_len)


async def models(request: Request) -> Response:
    client: EngineClient = request.app.state.client
    config: GatewayConfig = request.app.state.config
    cards = [
        _card(config, m)
        for m in client.models.values()
        if m.tokenizer is not None  # listed once requests for it can be served
    ]
    return json_response(ModelList(cards))


async def model_card(request: Request) -> Response:
    client: EngineClient = request.app.state.client
    name = request.path_params["model"]
    entry = client.models.get(name)
    if entry is None or entry.tokenizer is None:
        raise NotFound(f"The model `{name}` does not exist.", "model")
    return json_response(_card(request.app.state.config, entry))


async def openapi(request: Request) -> Response:
    return json_response(openapi_document())


async def health(request: Request) -> Response:
    client: EngineClient = request.app.state.client
    workers = [worker_row(w) for w in client.workers]
    ready = any(m.tokenizer is not None for m in client.models.values())
    ok = ready and any(w.routable for w in client.workers)
    body = {"status": "ok" if ok else "unavailable", "workers": workers}
    return json_response(body, 200 if ok else 503)


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE)


async def tokenize(request: Request) -> Response:
    req = await decode_body(await request.body(), TokenizeRequest)
    entry = request.app.state.client.model(req.model)
    tok = entry.tokenizer
    assert tok is not None
    if req.messages is not None:
        add = generation_prompt(req.add_generation_prompt, req.continue_final_message)
        tools = [tool_dict(t) for t in req.tools] if req.tools else None
        args = (entry, req.messages, add, False, tools, req.continue_final_message)
        ids = await offload(
            chat_chars(req.messages), chat_prompt_ids, *args, req.chat_template_kwargs
        )
    elif req.prompt is not None:
        ids = await offload(len(req.prompt), tok.encode, req.prompt, req.add_special_tokens)
    else:
        raise BadRequest("either prompt or messages is required", "prompt")
    strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return json_response(TokenizeResponse(len(ids), entry.info.max_model_len, ids, strs))


async def detokenize(request: Request) -> Response:
    req = await decode_body(await request.body(), DetokenizeRequest)
    entry = request.app.state.client.model(req.model)
    tok = entry.tokenizer
    assert tok is not None
    vocab = entry.info.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise BadRequest(f"token ids must be in [0, {vocab})", "tokens")
    return json_response(DetokenizeResponse(tok.decode(req.tokens)))
