"""A worker killed mid-stream: two fake-engine workers behind one gateway, streams on both,
then SIGKILL one. Its streams must end with an error event (and [DONE]) within a second;
every stream on the other worker must finish whole.

    python -m scripts.reliability.kill_worker --streams 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx

from scripts.reliability.cluster import MODEL, cluster


async def stream(c: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[str, float]:
    """('ok' | 'error event' | what went wrong, when it ended)."""
    body = {"model": MODEL, "prompt": f"s{i}", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    tokens, usage, error, done = 0, None, False, False
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return f"status {r.status_code}", time.monotonic()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                ev = json.loads(line[6:])
                error |= "error" in ev
                tokens += len(ev.get("choices", []))
                usage = (ev.get("usage") or {}).get("completion_tokens", usage)
    if not done:
        return "no [DONE]", time.monotonic()
    if error:
        return "error event", time.monotonic()
    ok = usage == tokens == max_tokens
    return ("ok" if ok else f"usage {usage} tokens {tokens}"), time.monotonic()


async def load(c: Any, streams: int, max_tokens: int, kill_after: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=c.base, timeout=120, limits=limits) as http:
        tasks = [asyncio.ensure_future(stream(http, i, max_tokens)) for i in range(streams)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # every stream running, on both workers
            workers = (await http.get("/health")).json()["workers"]
            if sum(w["num_running"] for w in workers) == streams:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(kill_after)
        on_killed = workers[0]["num_running"]
        killed_at = time.monotonic()
        c.workers[0].kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    counts: dict[str, int] = {}
    error_delays = []
    for r in results:
        key = r[0] if isinstance(r, tuple) else f"exception {type(r).__name__}"
        counts[key] = counts.get(key, 0) + 1
        if isinstance(r, tuple) and r[0] == "error event":
            error_delays.append(r[1] - killed_at)
    return {
        "streams": streams,
        "on_killed_worker": on_killed,
        "results": counts,
        "error_event_within_s": round(max(error_delays), 2) if error_delays else None,
    }


def run(streams: int = 200, max_tokens: int = 200, step_ms: float = 20) -> dict[str, Any]:
    flags = ("--fake-step-ms", str(step_ms))
    with cluster(num_workers=2, worker_flags=flags) as c:
        result = asyncio.run(load(c, streams, max_tokens, kill_after=0.5))
        ok_after = httpx.post(f"{c.base}/v1/completions", timeout=30,
                              json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code  # fmt: skip
        result["request_after_kill"] = ok_after
        result["gateway_errors_logged"] = c.gateway_log().count("Traceback")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=200)
    a = p.parse_args()
    print(json.dumps(run(a.streams, a.max_tokens), indent=1))


if __name__ == "__main__":
    main()
