"""`bench serve --client-processes N`: the requests of one rate shared by N client processes.

Near 1,000 concurrent streams one Python process cannot parse every streamed event as fast as
the server sends them (H200, W3 at infinite rate: 30 s of client CPU in a 49 s run, and the
last tokens read late), so the measured duration is partly the client's. Here child k of N
takes requests k, k + N, ... with arrivals at rate / N (N independent Poisson processes at
rate / N make one at `rate`; at inf all are sent at once) and at most ceil(max_concurrency /
N) in flight. The children build their request bodies and HTTP clients first, report ready,
and start together at a time the parent gives (perf_counter is CLOCK_MONOTONIC, one clock for
every process on the host); the run lasts from that start to the last child's last byte.

The parent and its children talk JSON lines over stdin / stdout (`python -m
headrace.bench.serve_procs`): the job, then `ready`, then the start time, then the results.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import subprocess
import sys
import time
from typing import IO, Any

from headrace.bench.report import summarize_run
from headrace.bench.serve import (
    RequestResult,
    http_client,
    launch_all,
    process_cpu_seconds,
    request_bodies,
)


def jobs(
    args: argparse.Namespace,
    model: str,
    vocab: list[int],
    reqs: list[RequestResult],
    rate: float,
    n: int,
) -> list[dict[str, Any]]:
    """Child k's job: every n-th request from k, at rate / n, its share of the concurrency."""
    conc = args.max_concurrency and -(-args.max_concurrency // n)
    return [
        {
            "base_url": args.base_url,
            "api_key": args.api_key,
            "model": model,
            "vocab": vocab,
            "seed": args.seed,
            "temperature": args.temperature,
            "indices": list(range(k, len(reqs), n)),
            "lens": [[r.prompt_len, r.output_len] for r in reqs[k::n]],
            "rate": rate / n,
            "max_concurrency": conc,
            "rng_seed": args.seed + 1 + 7919 * k,
        }
        for k in range(n)
    ]


def run_rate_in_processes(
    args: argparse.Namespace,
    model: str,
    vocab: list[int],
    reqs: list[RequestResult],
    rate: float,
    n: int,
) -> dict[str, Any]:
    """One rate's run over n client processes; the summary as `_run_rate`'s (reqs filled)."""
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "headrace.bench.serve_procs"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    try:
        for child, job in zip(children, jobs(args, model, vocab, reqs, rate, n), strict=True):
            _send(child.stdin, job)
        for child in children:
            if _recv(child) != "ready":
                raise RuntimeError("a client process did not get ready")
        cpu0 = process_cpu_seconds(args.measure_pid) if args.measure_pid else 0.0
        t0 = time.perf_counter() + 0.05  # every child is waiting for it
        for child in children:
            _send(child.stdin, t0)
        outs = [_recv(child) for child in children]
        cpu = process_cpu_seconds(args.measure_pid) - cpu0 if args.measure_pid else None
    finally:
        for child in children:
            if child.stdin:
                child.stdin.close()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
    for k, out in enumerate(outs):
        for r, got in zip(reqs[k::n], out["results"], strict=True):
            for f, v in got.items():
                setattr(r, f, math.nan if v is None and f in ("ttft", "e2e") else v)
    duration = max(out["end"] for out in outs) - t0
    result = summarize_run(rate, reqs, duration, args.max_concurrency, cpu, args.save_detailed)
    result["client_cpu_s"] = sum(out["cpu_s"] for out in outs)
    return result


def _send(pipe: IO[str] | None, obj: Any) -> None:
    assert pipe is not None
    pipe.write(json.dumps(obj) + "\n")
    pipe.flush()


def _recv(child: subprocess.Popen[str]) -> Any:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        raise RuntimeError(f"a client process exited (status {child.wait()})")
    return json.loads(line)


async def _child(job: dict[str, Any], inp: IO[str], out: IO[str]) -> None:
    ns = argparse.Namespace(
        base_url=job["base_url"], api_key=job["api_key"], seed=job["seed"],
        temperature=job["temperature"],
    )  # fmt: skip
    reqs = [RequestResult(prompt_len=p, output_len=o) for p, o in job["lens"]]
    bodies = request_bodies(ns, job["model"], job["vocab"], reqs, job["indices"])
    async with http_client(ns) as client:
        _send(out, "ready")
        t0 = float(json.loads(await asyncio.to_thread(inp.readline)))
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
        own0 = time.process_time()
        rate, rng = float(job["rate"]), random.Random(job["rng_seed"])
        await launch_all(client, reqs, bodies, rate, job["max_concurrency"], rng, t0)
        end = time.perf_counter()
        cpu = time.process_time() - own0
    results = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
        for d in map(dataclasses.asdict, reqs)
    ]
    _send(out, {"results": results, "end": end, "cpu_s": cpu})


def main() -> None:
    job = json.loads(sys.stdin.readline())
    asyncio.run(_child(job, sys.stdin, sys.stdout))


if __name__ == "__main__":
    main()
