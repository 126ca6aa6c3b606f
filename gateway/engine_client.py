"""The gateway's view of its workers: submit token-id requests, stream their outputs, abort.

One `EngineClient` per gateway process holds a `WorkerConnection` per worker address, the
`Router`, the `InFlight` table of its requests (gateway/inflight.py), and the tokenizer of
every model the workers serve (loaded when a worker first introduces its model). `submit`
routes one API call's requests (n completions of one or more prompts) and returns their
`Submission`; the connections deliver the outputs through the table.
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
from gateway.inflight import Child, InFlight, Submission
from gateway.route_note import current_note
from gateway.router import Router
from gateway.workers import ConnectionConfig, WorkerConnection
from ipc.messages import AbortRequests, EngineRequest, ModelInfo

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
        self.connection = ConnectionConfig(self.gateway_id, timeout=worker_timeout)
        self.tokenizer_override = tokenizer
        self.max_queued_requests = max_queued_requests
        self.workers: list[WorkerConnection] = []
        self.models: dict[str, ModelEntry] = {}
        self.inflight = InFlight()
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
            ids = self.inflight.request_ids(conn)
            if conn.up and ids:
                conn.send(AbortRequests(ids))
            await conn.close()
        for task in self._loads:
            task.cancel()
        if self._ctx is not None:
            self._ctx.term()

    # ------------------------------------------------------------------ the worker list

    def _connect(self, address: str) -> WorkerConnection:
        assert self._ctx is not None, "start() first"
        conn = WorkerConnection(
            self._ctx, address, self.connection, self.inflight, on_model_info=self._on_model_info
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
                logger.info("draining worker %s (%d in flight)", address, conn.num_inflight)
                return True
        return False

    async def _reap_drained(self, interval: float = 0.1) -> None:
        while True:
            await asyncio.sleep(interval)
            for conn in [w for w in self.workers if w.draining and not w.num_inflight]:
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

    @property
    def num_waiting(self) -> int:
        """Submitted requests with no output yet."""
        return self.inflight.num_waiting

    def submit(self, model: str, children: list[Child]) -> Submission:
        """Route and send; raises TooManyRequests or ServiceUnavailable before sending any."""
        limit = self.max_queued_requests
        if limit is not None and self.num_waiting + len(children) > limit:
            raise TooManyRequests(
                f"too many requests waiting ({self.num_waiting}; --max-queued-requests {limit})"
            )
        sub = Submission(self.inflight, children)
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
            self.inflight.add(child, sub, index, conn)
        return sub
