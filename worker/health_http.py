"""`headrace worker --health-port N`: GET /health over plain HTTP, for probes that cannot
speak ZeroMQ (a Kubernetes readiness probe, a load balancer's or monitor's check).

    200 {"status": "ok", ...load}        the engine is built and its loop runs
    503 {"status": "loading"}            still loading weights / capturing graphs
    503 {"status": "draining"}           SIGTERM: finishing its requests, taking no new ones
    503 {"status": "failed", "error"}    the engine loop died (the process exits soon)

It runs in its own daemon thread (the standard library's ThreadingHTTPServer) and only
reads the worker's published numbers, so it never waits on the engine.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.server import WorkerServer

Status = Callable[[], tuple[int, dict[str, Any]]]


def serve_health(host: str, port: int, status: Status) -> ThreadingHTTPServer:
    """Start answering GET /health on host:port with `status()`; returns the server
    (call .shutdown() to stop it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/health":
                code, body = 404, {"error": f"no route {self.path}"}
            else:
                code, body = status()
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would flood the log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server


def worker_health(w: WorkerServer) -> tuple[int, dict[str, Any]]:
    """The /health answer for `w`, read from what its threads publish (never waits)."""
    if w._failure is not None:
        return 503, {"status": "failed", "error": repr(w._failure)}
    if not w._ready.is_set() or w.model_info is None:
        return 503, {"status": "loading", "worker_id": w.worker_id}
    if w.admission.draining:  # SIGTERM: a readiness probe takes it out of rotation
        return 503, {"status": "draining", "worker_id": w.worker_id}
    stats = w._published[0]
    return 200, {
        "status": "ok",
        "worker_id": w.worker_id,
        "model": w.model_info.model_name,
        "num_running": stats.num_running,
        "num_waiting": stats.num_waiting,
        "kv_cache_usage": round(stats.kv_cache_usage, 4),
        "gateways": len(w._gateways),
    }
