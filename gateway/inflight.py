"""The gateway's requests in flight: one table, keyed by engine request id.

    submit --add--> waiting --first output--> started --final output--> gone
                       |                         |
                       +-- abort (stop string, client gone), worker lost --> gone

A `Route` is one engine request on its way: the `Submission` (one API call) it belongs to,
its index there, and the worker it went to. What the rest of the gateway asks follows
from the table: a submission is done once none of its children is in it and their outputs
are read; a worker's share of the load is `count(worker)` (a draining worker closes at
0); `num_waiting` (the --max-queued-requests limit) counts the routes with no output yet.

Outputs come in through `deliver` (a worker's connection), aborts through `abort` (a
submission), a dead or restarted worker through `fail_worker` (its connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ipc.messages import AbortRequests, FinishReason, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from gateway.workers import WorkerConnection

UNAVAILABLE = 503  # the status of a request whose worker was lost under it


@dataclass
class Child:
    """One engine request of a submission."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class Route:
    """Where one engine request in flight went, and whether it has started."""

    submission: Submission
    index: int  # its child index in the submission
    worker: WorkerConnection
    started: bool = False  # an output arrived (it no longer waits in a queue)


class InFlight:
    """Every engine request this gateway has sent and not yet seen end."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        # Indexes over _routes, changed only with it (_insert, _start, _remove).
        self._by_worker: dict[WorkerConnection, set[str]] = {}
        self._num_waiting = 0

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._routes

    def __len__(self) -> int:
        return len(self._routes)

    @property
    def num_waiting(self) -> int:
        """Requests with no output yet."""
        return self._num_waiting

    def count(self, worker: WorkerConnection) -> int:
        return len(self._by_worker.get(worker, ()))

    def request_ids(self, worker: WorkerConnection) -> list[str]:
        return list(self._by_worker.get(worker, ()))

    # ------------------------------------------------------------------ changes

    def add(
        self, child: Child, submission: Submission, index: int, worker: WorkerConnection
    ) -> None:
        """`child` (submission.children[index]) was sent to `worker`."""
        if child.request_id in self._routes:
            raise ValueError(f"request id {child.request_id!r} is in flight already")
        self._routes[child.request_id] = Route(submission, index, worker)
        self._by_worker.setdefault(worker, set()).add(child.request_id)
        self._num_waiting += 1

    def deliver(self, outputs: Iterable[RequestOutput]) -> None:
        """A worker's outputs, each handed to its submission; a final one ends its route.
        Outputs of requests not in flight (aborted here while the worker computed them)
        are dropped."""
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue
            self._start(route)
            if out.finish_reason is not None:
                self._remove(out.request_id)
            route.submission.put(route.index, out)

    def abort(self, request_ids: Iterable[str]) -> None:
        """Forget these requests and tell their workers (one message per worker); ids not
        in flight are ignored."""
        by_worker: dict[WorkerConnection, list[str]] = {}
        for rid in request_ids:
            route = self._remove(rid)
            if route is not None:
                by_worker.setdefault(route.worker, []).append(rid)
        for worker, ids in by_worker.items():
            worker.send(AbortRequests(ids))

    def fail_worker(self, worker: WorkerConnection, why: str) -> None:
        """Fail everything in flight on `worker` at once (a 503 each), and tell the worker
        in case it lives."""
        ids = self.request_ids(worker)
        message = f"worker {worker.address} stopped answering: {why}"
        for rid in ids:
            route = self._remove(rid)
            assert route is not None
            out = RequestOutput(
                rid, finish_reason=FinishReason.ERROR, error=message, error_status=UNAVAILABLE
            )
            route.submission.put(route.index, out)
        if ids:
            worker.send(AbortRequests(ids))

    def check(self) -> None:
        """AssertionError unless the indexes agree with the routes (for tests)."""
        on_workers = {rid for ids in self._by_worker.values() for rid in ids}
        assert on_workers == set(self._routes), "a route missing from its worker's index"
        for worker, ids in self._by_worker.items():
            assert all(self._routes[rid].worker is worker for rid in ids)
        assert self._num_waiting == sum(not r.started for r in self._routes.values())

    def _start(self, route: Route) -> None:
        if not route.started:
            route.started = True
            self._num_waiting -= 1

    def _remove(self, request_id: str) -> Route | None:
        route = self._routes.pop(request_id, None)
        if route is None:
            return None
        self._start(route)
        ids = self._by_worker[route.worker]
        ids.discard(request_id)
        if not ids:
            del self._by_worker[route.worker]
        return route


class Submission:
    """The engine requests of one API call; iterate it for lists of (child index, output).

    Outputs arrive batched per engine step and are handed over in one list per wake-up, so
    a slow reader catches up in one go instead of one output at a time. Iteration ends
    when no child is in flight and every output has been read.
    """

    def __init__(self, inflight: InFlight, children: list[Child]) -> None:
        self.inflight = inflight
        self.children = children
        self._items: list[tuple[int, RequestOutput]] = []
        self._event = asyncio.Event()

    def put(self, index: int, out: RequestOutput) -> None:
        self._items.append((index, out))
        self._event.set()

    @property
    def in_flight(self) -> bool:
        return any(c.request_id in self.inflight for c in self.children)

    def __aiter__(self) -> Submission:
        return self

    async def __anext__(self) -> list[tuple[int, RequestOutput]]:
        while not self._items:
            if not self.in_flight:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        items, self._items = self._items, []
        return items

    def abort(self, index: int) -> None:
        """Stop one child (its stop string matched); its worker frees it within one step."""
        self.inflight.abort([self.children[index].request_id])

    def close(self) -> None:
        """Abort whatever has not finished (client gone, error); safe to call twice."""
        self.inflight.abort([c.request_id for c in self.children])
