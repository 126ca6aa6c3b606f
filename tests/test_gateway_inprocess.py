"""The gateway's HTTP app in process: build_app with a fake engine client, no sockets, no
worker. Requests go through httpx's ASGI transport; a disconnect through fake receive/send."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import GatewayConfig, build_app
from gateway.engine_client import ModelEntry
from gateway.errors import NotFound
from gateway.inflight import Child, InFlight, Submission
from gateway.tokenizer import load_tokenizer
from ipc.messages import AbortRequests, FinishReason, ModelInfo, RequestOutput

MODEL = "stories"


class FakeWorker:
    """Stands in for a WorkerConnection: records the aborts the in-flight table sends."""

    address = "fake"

    def __init__(self) -> None:
        self.aborted: list[str] = []

    def send(self, msg: Any) -> bool:
        if isinstance(msg, AbortRequests):
            self.aborted += msg.request_ids
        return True


class FakeEngineClient:
    """What the serving code needs of EngineClient, over a real in-flight table; each child
    gets token 403, one per tick, until its max_tokens."""

    def __init__(self, tokenizer_path: Path) -> None:
        info = ModelInfo(MODEL, str(tokenizer_path), 256, 512, "fake")
        self.models = {MODEL: ModelEntry(MODEL, info, load_tokenizer(str(tokenizer_path)))}
        self.workers: list[Any] = []
        self.inflight = InFlight()
        self.worker = FakeWorker()
        self.submitted: list[Child] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def num_waiting(self) -> int:
        return self.inflight.num_waiting

    @property
    def aborted(self) -> list[str]:
        return self.worker.aborted

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    def model(self, name: str | None) -> ModelEntry:
        if name not in (None, MODEL):
            raise NotFound(f"The model `{name}` does not exist.", "model")
        return self.models[MODEL]

    def submit(self, model: str, children: list[Child]) -> Submission:
        sub = Submission(self.inflight, children)
        for index, child in enumerate(children):
            self.inflight.add(child, sub, index, self.worker)  # type: ignore[arg-type]
        self.submitted += children
        task = asyncio.ensure_future(self._emit(children))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return sub

    async def _emit(self, children: list[Child]) -> None:
        for step in range(max(c.params.max_tokens or 1 for c in children)):
            await asyncio.sleep(0.001)
            outs = [
                RequestOutput(
                    c.request_id, [403],
                    finish_reason=FinishReason.LENGTH if step + 1 == c.params.max_tokens else None,
                )
                for c in children
                if step < (c.params.max_tokens or 1)
            ]  # fmt: skip
            self.inflight.deliver(outs)  # those aborted meanwhile are dropped


@pytest.fixture
def client(stories_path: Path) -> FakeEngineClient:
    return FakeEngineClient(stories_path)


def post(client: FakeEngineClient, path: str, body: dict[str, Any]) -> httpx.Response:
    app = build_app(GatewayConfig(workers=["unused"]), client)  # type: ignore[arg-type]

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post(path, json=body)

    return asyncio.run(go())


def test_completion_whole_and_streamed(client: FakeEngineClient) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "n": 2}
    r = post(client, "/v1/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["finish_reason"] for c in out["choices"]] == ["length", "length"]
    assert out["usage"]["completion_tokens"] == 6
    r = post(client, "/v1/completions", body | {"stream": True})
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sum(c["choices"][0]["finish_reason"] == "length" for c in chunks) == 2


def test_chat_stream_starts_with_the_role(client: FakeEngineClient, tmp_path: Path) -> None:
    from tests.server_harness import make_chat_model

    chat = FakeEngineClient(make_chat_model(Path(client.models[MODEL].info.model_path), tmp_path))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = post(chat, "/v1/chat/completions", body | {"stream": True})
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    first = json.loads(events[0])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]"


def test_user_errors_are_openai_errors(client: FakeEngineClient) -> None:
    r = post(client, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = post(client, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 600})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post(client, "/v1/chat/completions", {"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert client.submitted == []  # nothing reached the engine


def test_client_disconnect_mid_stream_aborts_the_requests(client: FakeEngineClient) -> None:
    app = build_app(GatewayConfig(workers=["unused"]), client)  # type: ignore[arg-type]
    body = json.dumps({"model": MODEL, "prompt": "Once", "max_tokens": 200, "stream": True})
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    unread = [{"type": "http.request", "body": body.encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if unread:
            return unread.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            gone.set()  # the client leaves after its first chunk

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("test", 80), "app": app,
    }  # fmt: skip
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    assert client.submitted, sent
    assert [c.request_id for c in client.submitted] == client.aborted
    assert len(sent) < 50  # the stream stopped long before its 200 tokens
