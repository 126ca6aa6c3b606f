"""Scale-out with real processes on the model-free fake engine (cheap on CPU): session
affinity through two gateways, a dead worker's sessions moving, workers added and removed
on a running gateway, and routing from the workers' own load."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from tests.server_harness import (
    Proc,
    free_port,
    health,
    start_gateway,
    start_worker,
    wait_healthy,
)

MODEL = "fake"
KEY = {"Authorization": "Bearer k"}


def start_fake_worker(
    model: Path, log_dir: Path, name: str, step_ms: float = 5, *extra: str
) -> tuple[Proc, str]:
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = start_worker(
        model, address, log_dir, "--fake-engine", "--fake-step-ms", str(step_ms),
        "--served-model-name", MODEL, "--worker-id", name, "--gateway-timeout", "2", *extra,
    )  # fmt: skip
    proc.log = log_dir / f"worker-{name}.log"
    return proc, address


def stop_all(procs: list[Proc]) -> None:
    for p in reversed(procs):
        p.stop()


async def complete(
    c: httpx.AsyncClient,
    base: str,
    session: str | None,
    *,
    by_header: bool,
    stream: bool,
    chat: bool = False,
) -> str:
    """One request; returns the X-Headrace-Worker header (checked: the stream ended well)."""
    body: dict = {"model": MODEL, "max_tokens": 3, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": "hello"}]
    else:
        body["prompt"] = "hello"
    headers = {}
    if session is not None and by_header:
        headers["X-Session-ID"] = session
    elif session is not None:
        body["user"] = session
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with c.stream("POST", f"{base}{path}", json=body, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        text = (await r.aread()).decode()
    if stream:
        assert text.rstrip().endswith("data: [DONE]"), text
    else:
        assert json.loads(text)["usage"]["completion_tokens"] == 3
    return r.headers["x-headrace-worker"]


def run_sessions(bases: list[str], sessions: int = 50, per_session: int = 4) -> dict[str, set[str]]:
    """sessions x per_session requests, each session's alternating between the gateways;
    half keyed by header, half by the `user` field; half streamed; a quarter chat."""

    async def go() -> dict[str, set[str]]:
        seen: dict[str, set[str]] = collections.defaultdict(set)
        sem = asyncio.Semaphore(40)

        async def one(c: httpx.AsyncClient, s: int, j: int) -> None:
            async with sem:
                base = bases[(s + j) % len(bases)]
                worker = await complete(
                    c, base, f"s{s}", by_header=s % 2 == 0, stream=j % 2 == 0, chat=j % 4 == 1
                )
                seen[f"s{s}"].add(worker)

        async with httpx.AsyncClient(timeout=30) as c:
            await asyncio.gather(
                *(one(c, s, j) for s in range(sessions) for j in range(per_session))
            )
        return seen

    return asyncio.run(go())


def test_session_affinity_across_gateways_and_failover(tmp_path: Path, chat_model: Path) -> None:
    procs: list[Proc] = []
    try:
        addrs = []
        for i in range(3):
            proc, address = start_fake_worker(chat_model, tmp_path, f"w{i}")
            procs.append(proc)
            addrs.append(address)
        workers = procs[:3]
        ports = [free_port(), free_port()]
        procs += [start_gateway(addrs, p, tmp_path, "--routing", "session") for p in ports]
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        for b in bases:
            wait_healthy(b, procs, workers_up=3)

        before = run_sessions(bases)
        assert all(len(ws) == 1 for ws in before.values()), before
        owner = {s: next(iter(ws)) for s, ws in before.items()}
        counts = collections.Counter(owner.values())
        assert set(counts) == {"w0", "w1", "w2"}, counts  # hashing spreads the sessions

        # Kill the worker holding the most sessions; both gateways notice within 0.5 s.
        dead = counts.most_common(1)[0][0]
        workers[int(dead[1])].kill()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            states = [{w["worker_id"]: w["state"] for w in health(b)["workers"]} for b in bases]
            if all(s.get(dead) == "down" for s in states):
                break
            time.sleep(0.05)
        after = run_sessions(bases)
        assert all(len(ws) == 1 for ws in after.values()), after
        moved = {s: next(iter(ws)) for s, ws in after.items() if owner[s] == dead}
        kept = {s: next(iter(ws)) for s, ws in after.items() if owner[s] != dead}
        assert dead not in moved.values() and len(moved) == counts[dead]
        assert all(owner[s] == w for s, w in kept.items())  # the others' sessions stay put
    finally:
        stop_all(procs)


async def stream_tokens(
    c: httpx.AsyncClient, base: str, max_tokens: int, started: list[str]
) -> tuple[str, int, bool]:
    """A stream of `max_tokens`; appends its worker to `started` once the headers are in."""
    body = {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "stream": True}
    body["stream_options"] = {"include_usage": True}
    tokens = 0
    done = False
    async with c.stream("POST", f"{base}/v1/completions", json=body) as r:
        assert r.status_code == 200
        worker = r.headers["x-headrace-worker"]
        started.append(worker)
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
    return worker, tokens, done


def test_add_and_remove_workers_on_a_running_gateway(tmp_path: Path, stories_path: Path) -> None:
    procs: list[Proc] = []
    try:
        health_port = free_port()
        wa, a = start_fake_worker(
            stories_path, tmp_path, "wa", 20, "--health-port", str(health_port)
        )
        wb, b = start_fake_worker(stories_path, tmp_path, "wb", step_ms=20)
        procs += [wa, wb]
        workers_file = tmp_path / "workers"
        workers_file.write_text(f"# the GPU hosts\n{a}\n")
        port = free_port()
        gw = start_gateway(
            [], port, tmp_path, "--workers-file", str(workers_file), "--api-key", "k"
        )
        procs.append(gw)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, procs, workers_up=1)
        # The worker's own HTTP /health (for readiness probes), beside its ZeroMQ socket.
        r = httpx.get(f"http://127.0.0.1:{health_port}/health", timeout=5)
        assert r.status_code == 200 and r.json()["worker_id"] == "wa", r.text
        assert r.json()["gateways"] == 1
        assert httpx.get(f"http://127.0.0.1:{health_port}/nope", timeout=5).status_code == 404

        async def burst(n: int) -> list[str]:
            async with httpx.AsyncClient(timeout=30, headers=KEY) as c:
                return await asyncio.gather(
                    *(complete(c, base, None, by_header=True, stream=False) for _ in range(n))
                )

        assert set(asyncio.run(burst(4))) == {"wa"}
        # Add wb through the file (written aside, then moved over: never read half-written).
        tmp = tmp_path / "workers.new"
        tmp.write_text(f"{a}\n{b}\n")
        os.replace(tmp, workers_file)
        t0 = time.monotonic()
        while "wb" not in asyncio.run(burst(4)):
            assert time.monotonic() - t0 < 5, "the added worker got no traffic within 5 s"
        took = time.monotonic() - t0
        assert took < 5

        async def drain() -> tuple[list[tuple[str, int, bool]], list[str], list[dict]]:
            async with httpx.AsyncClient(timeout=60, headers=KEY) as c:
                started: list[str] = []
                streams = [
                    asyncio.ensure_future(stream_tokens(c, base, 60, started)) for _ in range(6)
                ]
                while len(started) < 6:
                    await asyncio.sleep(0.02)
                assert "wb" in started  # least loaded: the six spread over both
                r = await c.delete(f"{base}/admin/workers", params={"address": b})
                assert r.status_code == 200, r.text
                listed = {w["worker_id"]: w for w in r.json()["workers"]}
                assert listed["wb"]["state"] == "draining" and listed["wb"]["inflight"] > 0
                later = [
                    await complete(c, base, None, by_header=True, stream=False) for _ in range(6)
                ]
                results = await asyncio.gather(*streams)
                await asyncio.sleep(0.5)
                final = (await c.get(f"{base}/admin/workers")).json()["workers"]
                return results, later, final

        results, later, final = asyncio.run(drain())
        assert set(later) == {"wa"}  # no new requests for the draining worker
        on_b = [r for r in results if r[0] == "wb"]
        assert on_b and all(tokens == 60 and done for _, tokens, done in on_b)  # they finished
        assert [w["worker_id"] for w in final] == ["wa"]  # then it was dropped
        assert wb.alive()  # removing a worker from a gateway leaves the worker running
    finally:
        stop_all(procs)


def test_gateways_route_from_the_workers_reported_load(tmp_path: Path, stories_path: Path) -> None:
    """Gateway 1 knows only worker A and loads it; gateway 2 (both workers) sees A's load in
    A's own reports and sends its requests to B, though it has nothing in flight on A."""
    procs: list[Proc] = []
    try:
        wa, a = start_fake_worker(stories_path, tmp_path, "wa", step_ms=20)
        wb, b = start_fake_worker(stories_path, tmp_path, "wb", step_ms=20)
        procs += [wa, wb]
        p1, p2 = free_port(), free_port()
        procs += [start_gateway([a], p1, tmp_path), start_gateway([a, b], p2, tmp_path)]
        g1, g2 = f"http://127.0.0.1:{p1}", f"http://127.0.0.1:{p2}"
        wait_healthy(g1, procs)
        wait_healthy(g2, procs, workers_up=2)

        async def run() -> list[str]:
            async with httpx.AsyncClient(timeout=60) as c:
                started: list[str] = []
                busy = [asyncio.ensure_future(stream_tokens(c, g1, 100, started)) for _ in range(6)]
                while len(started) < 6:
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)  # a few heartbeats
                mine: list[str] = []
                tasks = []
                for n in range(5):  # one at a time: each sees the previous one's load
                    tasks.append(asyncio.ensure_future(stream_tokens(c, g2, 30, mine)))
                    while len(mine) == n:
                        await asyncio.sleep(0.01)
                await asyncio.gather(*busy, *tasks)
                return mine

        assert asyncio.run(run()) == ["wb"] * 5
    finally:
        stop_all(procs)


def test_worker_health_and_load_report_say_draining() -> None:
    """SIGTERM's drain (main's admission flag) reaches the readiness probe (503) and the
    load report, even while the engine loop is idle and publishes nothing new."""
    from ipc.messages import ModelInfo
    from worker.health_http import worker_health
    from worker.server import WorkerServer

    def no_engine() -> Any:
        raise AssertionError("not started")

    server = WorkerServer(no_engine, "tcp://127.0.0.1:1", worker_id="w0")
    try:
        assert worker_health(server)[1]["status"] == "loading"
        server.model_info = ModelInfo("m", "/m", 128, 100, "w0")
        server._ready.set()
        assert worker_health(server)[0] == 200
        assert not server._load_report([])[0].draining
        server.admission.draining = True
        assert worker_health(server) == (503, {"status": "draining", "worker_id": "w0"})
        assert server._load_report([])[0].draining
    finally:
        server._ctx.term()
