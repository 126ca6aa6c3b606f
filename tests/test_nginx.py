"""Real NGINX (the shipped config) in front of 2 gateways and 3 stories260K workers: 300
streaming clients, a gateway killed mid-run, and a client disconnect reaching the worker."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.nginx_harness import Nginx
from tests.server_harness import (
    Proc,
    free_port,
    health,
    metric,
    start_gateway,
    start_worker,
    wait_healthy,
)

pytestmark = [pytest.mark.nginx, pytest.mark.slow]
MODEL = "stories"


@dataclass
class Outcome:
    worker: str = ""
    done: bool = False  # ended with data: [DONE]
    closed: bool = False  # the connection closed before [DONE]
    chunks: int = 0  # events with choices
    usage: int = -1  # usage.completion_tokens from the last event
    errors: int = 0  # error events
    t_start: float = 0.0  # when the response headers came (the request was routed)
    t_end: float = 0.0


async def stream(
    c: httpx.AsyncClient, base: str, i: int, max_tokens: int, started: list[int] | None = None
) -> Outcome:
    body = {
        "model": MODEL,
        "prompt": f"Once upon a time {i}",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = Outcome()
    try:
        async with c.stream("POST", f"{base}/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            out.worker = r.headers["x-headrace-worker"]
            out.t_start = time.monotonic()
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    out.done = True
                elif line.startswith("data: "):
                    ev = json.loads(line[6:])
                    out.errors += "error" in ev
                    if ev.get("choices"):
                        if started is not None and out.chunks == 0:
                            started.append(i)  # its first token is in: it is running
                        out.chunks += 1
                    if ev.get("usage"):
                        out.usage = ev["usage"]["completion_tokens"]
    except (httpx.RemoteProtocolError, httpx.ReadError):
        out.closed = True
    if not out.done:
        out.closed = True
    out.t_end = time.monotonic()
    return out


def wait_idle(base: str, timeout: float) -> dict:
    """Until no worker reports a running or waiting request (its own count, every gateway)."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(base)
        busy = [w for w in h["workers"] if w["num_running"] or w["num_waiting"]]
        if not busy or time.monotonic() > deadline:
            return h
        time.sleep(0.1)


def test_nginx_two_gateways_three_workers(tmp_path: Path, chat_model: Path) -> None:
    procs: list[Proc] = []
    nginx: Nginx | None = None
    try:
        addrs = [f"tcp://127.0.0.1:{free_port()}" for _ in range(3)]
        extra = ["--served-model-name", MODEL, "--gateway-timeout", "2"]
        for i, a in enumerate(addrs):
            procs.append(start_worker(chat_model, a, tmp_path, *extra, "--worker-id", f"w{i}"))
        ports = [free_port(), free_port()]
        # A generous worker timeout: on a loaded CI machine a busy worker's heartbeats can
        # be late, and this test is about gateways dying, not workers.
        gateways = [start_gateway(addrs, p, tmp_path, "--worker-timeout", "3") for p in ports]
        procs += gateways
        gw_bases = [f"http://127.0.0.1:{p}" for p in ports]
        for b in gw_bases:
            wait_healthy(b, procs, timeout=180, workers_up=3)
        nginx = Nginx(tmp_path / "nginx", free_port(), ports)
        nginx.wait_up()
        base = nginx.base

        # 300 concurrent streams through NGINX: every one complete, usage right, spread.
        async def many() -> list[Outcome]:
            limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
            async with httpx.AsyncClient(timeout=120, limits=limits) as c:
                return await asyncio.gather(*(stream(c, base, i, 20) for i in range(300)))

        t0 = time.monotonic()
        results = asyncio.run(many())
        took = time.monotonic() - t0
        bad = [r for r in results if not r.done or r.closed or r.errors]
        assert not bad, (len(bad), bad[:5])
        # ignore_eos: exactly max_tokens each (events may hold several tokens, or none
        # while the detokenizer waits for the rest of a character).
        assert all(r.usage == 20 and r.chunks > 0 for r in results), results
        per_worker = collections.Counter(r.worker for r in results)
        assert set(per_worker) == {"w0", "w1", "w2"}, per_worker
        most, least = max(per_worker.values()), min(per_worker.values())
        assert most - least <= 0.25 * most, (per_worker, took)
        served = [metric(b, "headrace:e2e_request_latency_seconds_count") for b in gw_bases]
        assert sum(served) == 300 and min(served) > 0, served  # NGINX used both gateways
        print(f"300 streams in {took:.1f} s; per worker {dict(per_worker)}; per gateway {served}")
        first_end = min(r.t_end for r in results)
        print(
            "routed before the first finished:",
            sum(r.t_start < first_end for r in results),
            "last routed",
            max(r.t_start for r in results) - t0,
            "first end",
            first_end - t0,
        )

        # Kill one gateway while 40 longer streams run: its clients see the stream close,
        # the other's finish, new requests succeed through the survivor.
        async def kill_mid_run() -> tuple[list[Outcome], list[Outcome], list[int]]:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
            async with httpx.AsyncClient(timeout=120, limits=limits) as c:
                started: list[int] = []
                long = [asyncio.ensure_future(stream(c, base, i, 100, started)) for i in range(40)]
                while len(started) < 40:
                    await asyncio.sleep(0.02)
                inflight = [sum(w["inflight"] for w in health(b)["workers"]) for b in gw_bases]
                gateways[1].kill()
                await asyncio.sleep(0.2)
                new = await asyncio.gather(*(stream(c, base, 1000 + i, 8) for i in range(20)))
                return await asyncio.gather(*long), list(new), inflight

        long, new, inflight = asyncio.run(kill_mid_run())
        print(f"in flight per gateway when one was killed: {inflight}")
        assert inflight[0] > 0 and inflight[1] > 0, inflight  # least_conn used both
        closed = [r for r in long if r.closed]
        finished = [r for r in long if r.done]
        assert len(closed) == inflight[1] and len(finished) == inflight[0], (inflight, long)
        assert all(r.usage == 100 for r in finished), finished
        assert all(r.done and r.usage == 8 for r in new), new
        # The dead gateway's requests are aborted by the workers (--gateway-timeout 2).
        h = wait_idle(gw_bases[0], timeout=10)
        assert all(w["num_running"] == w["num_waiting"] == 0 for w in h["workers"]), h

        # A client that hangs up on NGINX: the worker stops its request well before the
        # end (the counters are the workers' own, as every gateway reports them).
        def generated() -> float:
            return metric(gw_bases[0], "headrace:generation_tokens_total")

        async def hang_up() -> None:
            body = {"model": MODEL, "prompt": "Once", "max_tokens": 480, "ignore_eos": True}
            body |= {"stream": True, "n": 4}  # 1920 tokens in all if nobody stops it
            url = f"{base}/v1/completions"
            async with httpx.AsyncClient(timeout=30) as c, c.stream("POST", url, json=body) as r:
                assert r.status_code == 200, await r.aread()
                events = 0
                async for line in r.aiter_lines():
                    events += line.startswith("data: ")
                    if events == 3:
                        break

        before = generated()
        asyncio.run(hang_up())
        h = wait_idle(gw_bases[0], timeout=5)
        assert all(w["num_running"] == 0 for w in h["workers"]), h
        time.sleep(0.3)  # the last counters in
        spent = generated() - before
        print(f"tokens generated for a hung-up request of 4 x 480: {spent:.0f}")
        assert spent < 4 * 480 / 2, spent
    finally:
        if nginx is not None:
            nginx.stop()
        for p in reversed(procs):
            p.stop()
