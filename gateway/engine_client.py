"""The gateway's view of its workers: submit token-id requests, stream their outputs, abort.

One `EngineClient` per gateway process holds a `WorkerConnection` per worker address, the
`Router`, and the tokenizer of every model the workers serve (loaded when a worker first
introduces its model). A `Submission` is one API call's requests (n completions of one or
more prompts); its outputs arrive batched per engine step and are handed over in one list
per wake-up, so a slow reader catches up in one go instead of one output at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq.asyncio

from gateway.errors import NotFound, ServiceUnavailable, TooManyRequests
from gateway.route_note import current_note
from gateway.router import Router
from gateway.workers import WorkerConnection
from ipc.messages import (
    AbortRequests,
    EngineOutputs,
    EngineRequest,
    FinishReason,
    ModelInfo,
    RequestOutput,
    SamplingParams,
)

if TYPE_CHECKING:
    from gateway.tokenizer import Tokenizer

logger = logging.getLogger("headrace.gateway")


@dataclass
class ModelEntry:
    """A model some worker serves, and its tokenizer once loaded."""

    name: str
    info: ModelInfo
    tokenizer: Tokenizer | None = None
    error: str | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Child:
    """One engine request of a submission."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class Submission:
    """The engine requests of one API call; iterate it for lists of (child index, output)."""

    def __init__(self, client: EngineClient, children: list[Child]) -> None:
        self.client = client
        self.children = children
        self.unfinished = set(range(len(children)))
        self.lost: set[int] = set()  # children whose worker died under them
        self.started: set[int] = set()  # children no longer waiting (output seen or gone)
        self._items: list[tuple[int, RequestOutput]] = []
        self._event = asyncio.Event()

    def put(self, index: int, out: RequestOutput) -> None:
        self._items.append((index, out))
        self._event.set()

    def __aiter__(self) -> Submission:
        return self

    async def __anext__(self) -> list[tuple[int, RequestOutput]]:
        while not self._items:
            if not self.unfinished:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        items, self._items = self._items, []
        for index, out in items:
            if out.finish_reason is not None:
                self.unfinished.discard(index)
        return items

    def abort(self, index: int) -> None:
        """Stop one child (its stop string matched); its worker frees it within one step."""
        if index in self.unfinished:
            self.unfinished.discard(index)
            self.client._abort([self.children[index].request_id])

    def close(self) -> None:
        """Abort whatever has not finished (client gone, error); safe to call twice."""
        ids = [self.children[i].request_id for i in self.unfinished]
        self.unfinished.clear()
        if ids:
            self.client._abort(ids)


def check_worker_queue(conn: WorkerConnection, children: list[Child]) -> None:
    """429 before sending when the worker's last heartbeat shows its queue full: a stream
    then gets a status, not an error event. (The worker enforces the limits exactly.)"""
    info, stats = conn.info, conn.stats
    if info is None:
        return
    limit = info.max_num_queued_reqs
    if limit is not None and stats.num_queued + len(children) > limit:
        raise TooManyRequests(
            f"the server is overloaded: {stats.num_queued} requests are queued "
            f"(--max-num-queued-reqs {limit}); retry later"
        )
    limit = info.max_num_queued_tokens
    tokens = sum(len(c.prompt_token_ids) for c in children)
    if limit is not None and stats.num_queued and stats.num_queued_tokens + tokens > limit:
        raise TooManyRequests(
            f"the server is overloaded: {stats.num_queued_tokens} prompt tokens are queued "
            f"(--max-num-queued-tokens {limit}); retry later"
        )


class EngineClient:
    def __init__(
        self,
        worker_addresses: Sequence[str],
        *,
        routing: str = "least-loaded",
        worker_timeout: float = 1.0,
        tokenizer: str | None = None,
        max_queued_requests: int | None = None,
        gateway_id: str | None = None,
    ) -> None:
        self.gateway_id = gateway_id or f"gw-{uuid.uuid4().hex[:12]}"
        self.addresses = list(worker_addresses)
        self.router = Router(routing)
        self.worker_timeout = worker_timeout
        self.tokenizer_override = tokenizer
        self.max_queued_requests = max_queued_requests
        self.workers: list[WorkerConnection] = []
        self.models: dict[str, ModelEntry] = {}
        self.num_waiting = 0  # submitted children with no output yet
        self._routes: dict[str, tuple[Submission, int, WorkerConnection]] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._loads: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        for address in self.addresses:
            self._connect(address)
        self._reaper = asyncio.ensure_future(self._reap_drained())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for conn in self.workers:
            if conn.up and conn.inflight:
                conn.send(AbortRequests(list(conn.inflight)))
            await conn.close()
        for task in self._loads:
            task.cancel()
        if self._ctx is not None:
            self._ctx.term()

    # ------------------------------------------------------------------ the worker list

    def _connect(self, address: str) -> WorkerConnection:
        assert self._ctx is not None, "start() first"
        conn = WorkerConnection(
            self._ctx,
            address,
            self.gateway_id,
            on_outputs=self._on_outputs,
            on_model_info=self._on_model_info,
            on_lost=self._on_lost,
            timeout=self.worker_timeout,
        )
        conn.start()
        self.workers.append(conn)
        return conn

    def add_worker(self, address: str) -> bool:
        """Connect to one more worker (or stop draining it); False if already in the list."""
        for conn in self.workers:
            if conn.address == address:
                was_draining, conn.draining = conn.draining, False
                return was_draining
        self._connect(address)
        logger.info("added worker %s", address)
        return True

    def remove_worker(self, address: str) -> bool:
        """Drain a worker: no new requests; it is dropped once its streams have finished.
        False if no such worker is in the list (or it is draining already)."""
        for conn in self.workers:
            if conn.address == address and not conn.draining:
                conn.draining = True
                logger.info("draining worker %s (%d in flight)", address, len(conn.inflight))
                return True
        return False

    async def _reap_drained(self, interval: float = 0.1) -> None:
        while True:
            await asyncio.sleep(interval)
            for conn in [w for w in self.workers if w.draining and not w.inflight]:
                self.workers.remove(conn)
                await conn.close()
                logger.info("removed worker %s", conn.address)

    async def wait_ready(self, timeout: float) -> bool:
        """True once some worker is up and its model's tokenizer is loaded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m.tokenizer is not None for m in self.models.values()) and any(
                w.up for w in self.workers
            ):
                return True
            await asyncio.sleep(0.05)
        return False

    # ------------------------------------------------------------------ models

    def model(self, name: str | None) -> ModelEntry:
        """The model a request names (or the only one); NotFound or ServiceUnavailable."""
        if not self.models:
            raise ServiceUnavailable(
                "the server is starting: no worker has loaded its model yet; try again "
                "shortly (GET /health answers 200 once it is ready)"
            )
        if not name:
            if len(self.models) > 1:
                raise NotFound(
                    "the model field is required: this server serves several models", "model"
                )
            entry = next(iter(self.models.values()))
        elif name in self.models:
            entry = self.models[name]
        else:
            raise NotFound(f"The model `{name}` does not exist.", "model")
        if entry.tokenizer is None:
            why = entry.error or "its tokenizer is still loading"
            raise ServiceUnavailable(f"model {entry.name!r} is not ready: {why}")
        if not any(w.routable and w.info and w.info.model_name == entry.name for w in self.workers):
            raise ServiceUnavailable(f"no worker serving model {entry.name!r} is available")
        return entry

    def _on_model_info(self, conn: WorkerConnection, info: ModelInfo) -> None:
        # Prefix routing keys prompts exactly as the workers key their cache blocks.
        self.router.block_size = info.block_size
        entry = self.models.get(info.model_name)
        if entry is not None:
            entry.info = info
            return
        entry = ModelEntry(info.model_name, info)
        self.models[info.model_name] = entry
        task = asyncio.ensure_future(self._load_tokenizer(entry))
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    async def _load_tokenizer(self, entry: ModelEntry) -> None:
        from gateway.tokenizer import load_tokenizer

        path = self.tokenizer_override or entry.info.tokenizer or entry.info.model_path
        try:
            entry.tokenizer = await asyncio.to_thread(load_tokenizer, path)
            logger.info("loaded the tokenizer of %s from %s", entry.name, path)
        except Exception as e:
            entry.error = f"cannot load the tokenizer from {path}: {e}"
            logger.error("%s", entry.error)
        entry.loaded.set()

    # ------------------------------------------------------------------ requests

    def submit(self, model: str, children: list[Child]) -> Submission:
        """Route and send; raises TooManyRequests or ServiceUnavailable before sending any."""
        limit = self.max_queued_requests
        if limit is not None and self.num_waiting + len(children) > limit:
            raise TooManyRequests(
                f"too many requests waiting ({self.num_waiting}; --max-queued-requests {limit})"
            )
        sub = Submission(self, children)
        note = current_note()
        session = note.session if note is not None else None
        # Children sharing a prompt go to one worker, so they share its prefix cache.
        chosen: dict[int, WorkerConnection] = {}
        for child in children:
            key = id(child.prompt_token_ids)
            if key not in chosen:
                conn = self.router.choose(self.workers, model, child.prompt_token_ids, session)
                chosen[key] = conn
                if note is not None:
                    note.served_by(conn.worker_id)
        for conn in set(chosen.values()):
            check_worker_queue(conn, children)
        now = time.time()
        for index, child in enumerate(children):
            conn = chosen[id(child.prompt_token_ids)]
            req = EngineRequest(child.request_id, child.prompt_token_ids, child.params, now)
            if not conn.send(req):
                sub.close()
                raise ServiceUnavailable(f"worker {conn.address} is not reachable")
            self._routes[child.request_id] = (sub, index, conn)
            conn.inflight.add(child.request_id)
            self.num_waiting += 1
        return sub

    def _abort(self, request_ids: list[str]) -> None:
        by_conn: dict[WorkerConnection, list[str]] = {}
        for rid in request_ids:
            route = self._routes.pop(rid, None)
            if route is None:
                continue
            sub, index, conn = route
            conn.inflight.discard(rid)
            self._mark_started(sub, index)
            by_conn.setdefault(conn, []).append(rid)
        for conn, ids in by_conn.items():
            conn.send(AbortRequests(ids))

    def _mark_started(self, sub: Submission, index: int) -> None:
        if index not in sub.started:
            sub.started.add(index)
            self.num_waiting -= 1

    def _on_outputs(self, conn: WorkerConnection, msg: EngineOutputs) -> None:
        routes = self._routes
        for out in msg.outputs:
            route = routes.get(out.request_id)
            if route is None:
                continue  # aborted here while the worker was still computing it
            sub, index, _ = route
            if index not in sub.started:
                sub.started.add(index)
                self.num_waiting -= 1
            if out.finish_reason is not None:
                del routes[out.request_id]
                conn.inflight.discard(out.request_id)
            sub.put(index, out)

    def _on_lost(self, conn: WorkerConnection, why: str) -> None:
        """Fail everything in flight on `conn` at once, and tell the worker in case it lives."""
        ids = list(conn.inflight)
        conn.inflight.clear()
        for rid in ids:
            route = self._routes.pop(rid, None)
            if route is None:
                continue
            sub, index, _ = route
            sub.lost.add(index)
            self._mark_started(sub, index)
            message = f"worker {conn.address} stopped answering: {why}"
            sub.put(index, RequestOutput(rid, finish_reason=FinishReason.ERROR, error=message))
        if ids:
            conn.send(AbortRequests(ids))
