"""1,000 concurrent streams on one gateway (fake engine), a third of them cancelled
mid-stream; every other stream must end with usage equal to its tokens and [DONE].

    python -m scripts.reliability.streams --streams 1000 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

import httpx

from scripts.reliability.cluster import MODEL, cluster


async def one_stream(c: httpx.AsyncClient, i: int, max_tokens: int, cancel: bool) -> str:
    """'ok', 'cancelled', or what went wrong."""
    body = {
        "model": MODEL, "prompt": f"stream {i}", "max_tokens": max_tokens, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    stop_after = random.randint(1, max_tokens - 1) if cancel else None
    tokens, usage, done = 0, None, False
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return f"status {r.status_code}"
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return f"error event: {ev['error']['message']}"
            tokens += len(ev["choices"])
            if ev.get("usage"):
                usage = ev["usage"]["completion_tokens"]
            if stop_after is not None and tokens >= stop_after:
                return "cancelled"  # leaving the block closes the connection
    if not done:
        return "no [DONE]"
    if usage != tokens or tokens != max_tokens:
        return f"usage {usage}, tokens {tokens}, wanted {max_tokens}"
    return "ok"


async def load(base: str, streams: int, max_tokens: int) -> dict[str, int]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as c:
        results = await asyncio.gather(
            *(one_stream(c, i, max_tokens, i % 3 == 0) for i in range(streams)),
            return_exceptions=True,
        )
    counts: dict[str, int] = {}
    for r in results:
        key = r if isinstance(r, str) else f"exception {type(r).__name__}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def run(streams: int = 1000, max_tokens: int = 64, step_ms: float = 20) -> dict[str, Any]:
    flags = ("--fake-step-ms", str(step_ms), "--max-num-seqs", str(streams))
    with cluster(worker_flags=flags) as c:
        t0 = time.monotonic()
        counts = asyncio.run(load(c.base, streams, max_tokens))
        took = time.monotonic() - t0
        time.sleep(0.5)  # cancelled streams' aborts reach the worker
        worker = httpx.get(f"{c.base}/health").json()["workers"][0]
        log = c.gateway_log()
    return {
        "streams": streams,
        "results": counts,
        "seconds": round(took, 1),
        "running_after": worker["num_running"],
        "inflight_after": worker["inflight"],
        "gateway_errors_logged": log.count(" ERROR "),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--step-ms", type=float, default=20)
    a = p.parse_args()
    print(json.dumps(run(a.streams, a.max_tokens, a.step_ms), indent=1))


if __name__ == "__main__":
    main()
