"""Soak: steady streaming load on one gateway and two real workers (stories260K), a worker
SIGKILLed every --kill-every seconds (none in the last 30 s) and restarted. At the end: no stream lost except those
on a killed worker (which got an error event), gateway memory flat, every KV block free.

    python -m scripts.reliability.soak --minutes 10 --kill-every 60 --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx

from scripts.reliability.cluster import MODEL, Cluster, cluster
from tests.server_harness import metric


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def client_loop(http: httpx.AsyncClient, stop: asyncio.Event, counts: dict[str, int]) -> None:
    while not stop.is_set():
        n = random.randint(8, 64)
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": n, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        tokens, usage, error, done = 0, None, None, False
        try:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    key = f"status {r.status_code}"
                    counts[key] = counts.get(key, 0) + 1
                    await asyncio.sleep(0.2)
                    continue
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            error = ev["error"]["message"]
                        tokens += len(ev.get("choices", []))
                        usage = (ev.get("usage") or {}).get("completion_tokens", usage)
        except httpx.HTTPError as e:
            key = f"exception {type(e).__name__}"
            counts[key] = counts.get(key, 0) + 1
            continue
        if error is not None:
            key = (
                "error event (killed worker)" if "stopped answering" in error else f"error: {error}"
            )
        elif not done:
            key = "lost: no [DONE]"
        elif usage == n and tokens <= n:  # text-less tokens send no event
            key = "ok"
        else:
            key = "lost: usage mismatch"
        counts[key] = counts.get(key, 0) + 1


async def soak(c: Cluster, seconds: float, kill_every: float, clients: int) -> dict[str, Any]:
    assert c.gateway is not None
    counts: dict[str, int] = {}
    stop = asyncio.Event()
    memory: list[float] = []
    kills = 0
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(base_url=c.base, timeout=120, limits=limits) as http:
        loops = [asyncio.ensure_future(client_loop(http, stop, counts)) for _ in range(clients)]
        t0 = time.monotonic()
        next_kill = t0 + kill_every
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(1)
            memory.append(rss_mb(c.gateway.popen.pid))
            # No kill in the last 30 s: the restarted worker is up before the KV check.
            if time.monotonic() >= next_kill and time.monotonic() - t0 < seconds - 30:
                i = kills % len(c.workers)
                c.workers[i].kill()
                c.restart_worker(i)
                kills += 1
                next_kill += kill_every
        stop.set()
        await asyncio.gather(*loops)
    deadline = time.monotonic() + 60  # restarted workers up, aborts applied
    while True:
        await asyncio.sleep(1)
        workers = httpx.get(f"{c.base}/health").json()["workers"]
        free = metric(c.base, "headrace:num_kv_blocks_free")
        total = metric(c.base, "headrace:num_kv_blocks_total")
        up = all(w["state"] == "up" for w in workers)
        if (up and free == total) or time.monotonic() > deadline:
            break
    warm = memory[min(len(memory) - 1, 30)] if memory else 0.0  # after 30 s of warm-up
    return {
        "seconds": round(seconds),
        "worker_kills": kills,
        "streams": counts,
        "lost_streams": sum(v for k, v in counts.items() if k.startswith("lost")),
        "gateway_rss_mb": {
            "after_warmup": round(warm, 1),
            "end": round(memory[-1], 1),
            "max": round(max(memory), 1),
        },
        "kv_blocks_free_at_end": f"{free:.0f}/{total:.0f}",
        "workers_at_end": [
            {
                k: w[k]
                for k in ("state", "num_running", "num_waiting", "num_free_blocks", "inflight")
            }
            for w in workers
        ],
        "gateway_tracebacks": c.gateway_log().count("Traceback"),
    }


def run(minutes: float = 10, kill_every: float = 60, clients: int = 32) -> dict[str, Any]:
    flags = ("--device", "cpu")
    with cluster(num_workers=2, fake=False, worker_flags=flags) as c:
        return asyncio.run(soak(c, minutes * 60, kill_every, clients))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--kill-every", type=float, default=60, help="seconds between worker kills")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    a = p.parse_args()
    print(json.dumps(run(a.minutes, a.kill_every, a.clients), indent=1))


if __name__ == "__main__":
    main()
