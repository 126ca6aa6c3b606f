"""`/admin/workers`: list, add and remove workers on a running gateway.

    GET    /admin/workers                     every worker and its state (as in /health)
    POST   /admin/workers   {"address": A}    connect to one more worker
    DELETE /admin/workers?address=A           drain it: no new requests, dropped once its
                                              streams have finished

They need `--api-key` (the same Bearer token as /v1/*): without one they answer 403, since
anyone who can reach the gateway could otherwise point it at their own "worker".
A change lasts until the gateway restarts; for a list that survives restarts use
`--workers-file` (gateway/workers_file.py), which the gateway re-reads when it changes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.engine_client import EngineClient
from gateway.errors import BadRequest, Forbidden, NotFound
from gateway.workers import WorkerConnection
from gateway.workers_file import check_worker_address

Handler = Callable[[Request], Awaitable[Response]]


class AddWorker(msgspec.Struct):
    address: str


def worker_row(w: WorkerConnection) -> dict[str, Any]:
    """One worker as /health and /admin/workers show it."""
    return {
        "address": w.address,
        "state": "draining" if w.draining or w.stats.draining else w.state.value,
        "worker_id": w.worker_id,
        "model": w.info.model_name if w.info else None,
        "num_running": w.stats.num_running,
        "num_waiting": w.stats.num_waiting,
        "num_queued": w.stats.num_queued,
        "num_inbox": w.stats.num_inbox,
        "num_free_blocks": w.stats.num_free_blocks,
        "kv_cache_usage": round(w.stats.kv_cache_usage, 4),
        "load": w.load,
        "inflight": w.num_inflight,
    }


def admin_routes(
    client: EngineClient,
    api_key: str | None,
    wrap: Callable[[Handler], Callable[[Request], Awaitable[Any]]],
    respond: Callable[[dict[str, Any]], Response],
) -> list[Route]:
    """The routes; `wrap` turns APIErrors into error responses, `respond` makes JSON."""

    def check_enabled() -> None:
        if not api_key:
            raise Forbidden("the admin endpoints are off: start the gateway with --api-key")

    def listing() -> dict[str, Any]:
        return {"workers": [worker_row(w) for w in client.workers]}

    async def get_workers(request: Request) -> Response:
        check_enabled()
        return respond(listing())

    async def add_worker(request: Request) -> Response:
        check_enabled()
        try:
            body = msgspec.json.decode(await request.body(), type=AddWorker)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise BadRequest(f'expected {{"address": "tcp://host:port"}}: {e}', "address") from None
        address = _checked(body.address)
        return respond({"added": client.add_worker(address), **listing()})

    async def remove_worker(request: Request) -> Response:
        check_enabled()
        address = _checked(request.query_params.get("address", ""))
        if not client.remove_worker(address):
            raise NotFound(f"no worker {address!r} is in the list (or it is draining)", "address")
        return respond({"removed": True, **listing()})

    return [
        Route("/admin/workers", wrap(get_workers), methods=["GET"]),
        Route("/admin/workers", wrap(add_worker), methods=["POST"]),
        Route("/admin/workers", wrap(remove_worker), methods=["DELETE"]),
    ]


def _checked(address: str) -> str:
    try:
        return check_worker_address(address, "address")
    except ValueError as e:
        raise BadRequest(str(e), "address") from None
