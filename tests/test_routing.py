"""Routing in process: session affinity by rendezvous hashing, load from the workers'
reports, the workers file, and the /admin/workers endpoints."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest
import zmq.asyncio
from starlette.testclient import TestClient

from gateway.app import GatewayConfig, build_app
from gateway.errors import ServiceUnavailable
from gateway.inflight import InFlight
from gateway.route_note import RouteNote, session_key
from gateway.router import Router, rendezvous_choice
from gateway.workers import ConnectionConfig, WorkerConnection, WorkerState
from gateway.workers_file import WorkersFileWatcher, check_worker_address, read_workers_file
from ipc.messages import ModelInfo, WorkerStats


def fake_worker(ctx: zmq.asyncio.Context, index: int, running: int = 0) -> WorkerConnection:
    """A connection that never starts its loops: state and info set by hand."""
    address = f"tcp://127.0.0.1:{40000 + index}"
    conn = WorkerConnection(
        ctx, address, ConnectionConfig("gw-test"), InFlight(), on_model_info=lambda *_: None
    )
    conn.info = ModelInfo("m", "/m", 128, 100, f"worker-{index}")
    conn.state = WorkerState.UP
    conn.stats = WorkerStats(num_running=running, num_free_blocks=10, num_total_blocks=10)
    return conn


@pytest.fixture
def workers() -> collections.abc.Iterator[list[WorkerConnection]]:
    ctx = zmq.asyncio.Context()
    conns = [fake_worker(ctx, i) for i in range(3)]
    yield conns
    for c in conns:
        c._sock.close(linger=0)
        c._monitor.close(linger=0)
    ctx.term()


def test_sessions_spread_and_only_a_dead_workers_sessions_move(
    workers: list[WorkerConnection],
) -> None:
    keys = [f"session-{i}" for i in range(3000)]
    before = {k: rendezvous_choice(k, workers).worker_id for k in keys}
    counts = collections.Counter(before.values())
    assert len(counts) == 3 and min(counts.values()) > 800, counts  # ~1000 each
    dead = workers[1]
    after = {k: rendezvous_choice(k, [workers[0], workers[2]]).worker_id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert set(moved) == {k for k in keys if before[k] == dead.worker_id}
    # They spread over both survivors instead of piling onto one.
    spread = collections.Counter(after[k] for k in moved)
    assert len(spread) == 2 and min(spread.values()) > 300, spread
    # Order of the list does not matter (another gateway may list workers differently).
    assert all(rendezvous_choice(k, workers[::-1]).worker_id == before[k] for k in keys[:200])


def test_session_router_falls_back_to_least_loaded_and_skips_draining(
    workers: list[WorkerConnection],
) -> None:
    router = Router("session")
    workers[0].stats = WorkerStats(num_running=5)
    workers[1].stats = WorkerStats(num_running=1)
    workers[2].stats = WorkerStats(num_running=3)
    assert router.choose(workers, "m", [1, 2], None) is workers[1]
    key = next(
        k for k in (f"s{i}" for i in range(100)) if rendezvous_choice(k, workers) is workers[0]
    )
    assert router.choose(workers, "m", [1, 2], key) is workers[0]  # busier, but its session
    workers[0].draining = True
    assert router.choose(workers, "m", [1, 2], key) is rendezvous_choice(key, workers[1:])
    # A worker draining on SIGTERM (its own report) loses its sessions the same way.
    workers[0].draining = False
    workers[0].stats = WorkerStats(num_running=5, draining=True)
    assert router.choose(workers, "m", [1, 2], key) is rendezvous_choice(key, workers[1:])
    for w in workers:
        w.state = WorkerState.DOWN
    with pytest.raises(ServiceUnavailable):
        router.choose(workers, "m", [1, 2], key)
    with pytest.raises(ValueError, match="routing must be one of"):
        Router("sticky")


def test_load_counts_other_gateways_and_unreported_sends(
    workers: list[WorkerConnection],
) -> None:
    w = workers[0]
    w._report(WorkerStats(num_running=6, num_waiting=2), received=0)
    assert w.load == 8  # all another gateway's: this one has nothing in flight there
    w.sent = 5  # five sent from here, two of them in the worker's latest report
    w._report(WorkerStats(num_running=8, num_waiting=2), received=2)
    assert w.load == 10 + 3
    w._report(WorkerStats(num_running=11, num_waiting=2), received=5)
    assert w.load == 13
    w._report(WorkerStats(num_running=0), received=0)  # restarted: it knows none of ours
    assert (w.sent, w.load) == (0, 0)
    w._report(WorkerStats(num_running=1), received=40)  # counted an earlier connection too
    w.sent += 2
    w._report(WorkerStats(num_running=2), received=41)
    assert w.load == 2 + 1
    # The inbox (not yet taken by the engine loop) adds; num_queued (admitted, no first
    # token yet) is inside running + waiting already, so it must not count twice.
    w._report(WorkerStats(num_running=2, num_waiting=3, num_queued=4, num_inbox=5), 41)
    assert w.load == 2 + 3 + 5 + 1
    # Least loaded is the one with the fewest requests ahead, whoever sent them.
    workers[1]._report(WorkerStats(num_running=1), received=0)
    workers[2]._report(WorkerStats(num_running=1, num_free_blocks=1, num_total_blocks=10), 0)
    assert Router().choose(workers[1:], "m", [1]) is workers[1]  # ties: emptier KV cache


def test_session_key_and_worker_header() -> None:
    assert session_key("  abc ", "user-1") == "abc"
    assert session_key(None, "user-1") == "user-1"
    assert session_key("", None) is None
    assert len(session_key("x" * 1000, None) or "") == 256
    note = RouteNote()
    assert note.headers() == {}
    note.served_by("w1")
    note.served_by("w1")
    note.served_by("wé")
    assert note.headers() == {"X-Headrace-Worker": "w1, w?"}


def test_workers_file_reading_and_watching(tmp_path: Path) -> None:
    path = tmp_path / "workers"
    path.write_text("# gpu hosts\ntcp://127.0.0.1:5550\n\ntcp://127.0.0.1:5551  # second\n")
    assert read_workers_file(path) == ["tcp://127.0.0.1:5550", "tcp://127.0.0.1:5551"]
    with pytest.raises(ValueError, match="line 2"):
        path.write_text("tcp://127.0.0.1:5550\ngpu-host:5551\n")
        read_workers_file(path)
    with pytest.raises(ValueError, match="needs a port"):
        check_worker_address("tcp://gpu-host", "--worker")
    with pytest.raises(ValueError, match="--workers-file"):
        read_workers_file(tmp_path / "missing")

    class Log:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str]] = []

        def add_worker(self, address: str) -> bool:
            self.calls.append(("add", address))
            return True

        def remove_worker(self, address: str) -> bool:
            self.calls.append(("remove", address))
            return True

    path.write_text("tcp://127.0.0.1:5550\ntcp://127.0.0.1:5551\n")
    watcher = WorkersFileWatcher(path, keep=["tcp://127.0.0.1:5551"])
    assert watcher.current == ["tcp://127.0.0.1:5550"]
    log = Log()
    assert not watcher.poll(log)  # unchanged
    time.sleep(0.01)
    path.write_text("tcp://127.0.0.1:5552\n")
    assert watcher.poll(log)
    # The --worker address (kept) is not the file's to remove.
    assert log.calls == [("add", "tcp://127.0.0.1:5552"), ("remove", "tcp://127.0.0.1:5550")]
    path.write_text("not an address\n")
    assert not watcher.poll(log)  # a bad edit changes nothing
    assert watcher.current == ["tcp://127.0.0.1:5552"]


def test_admin_workers_endpoints() -> None:
    config = GatewayConfig(workers=["tcp://127.0.0.1:1"], api_key="k")
    with TestClient(build_app(config)) as c:
        auth = {"Authorization": "Bearer k"}
        assert c.get("/admin/workers").status_code == 401
        r = c.get("/admin/workers", headers=auth)
        assert [w["address"] for w in r.json()["workers"]] == ["tcp://127.0.0.1:1"]
        r = c.post("/admin/workers", json={"address": "tcp://127.0.0.1:2"}, headers=auth)
        assert r.status_code == 200 and r.json()["added"] is True
        assert len(r.json()["workers"]) == 2
        r = c.post("/admin/workers", json={"address": "127.0.0.1:2"}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "address"
        r = c.post("/admin/workers", content=b"{", headers=auth)
        assert r.status_code == 400
        gone = c.delete("/admin/workers", params={"address": "tcp://127.0.0.1:9"}, headers=auth)
        assert gone.status_code == 404
        r = c.delete("/admin/workers", params={"address": "tcp://127.0.0.1:1"}, headers=auth)
        assert r.status_code == 200
        assert r.json()["workers"][0]["state"] == "draining"
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # nothing in flight: dropped at once
            listed = c.get("/admin/workers", headers=auth).json()["workers"]
            if len(listed) == 1:
                break
            time.sleep(0.05)
        assert [w["address"] for w in listed] == ["tcp://127.0.0.1:2"]
    with TestClient(build_app(GatewayConfig(workers=["tcp://127.0.0.1:1"]))) as c:
        r = c.get("/admin/workers")
        assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]
