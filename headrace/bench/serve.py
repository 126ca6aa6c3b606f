"""`headrace bench serve`: load a running OpenAI-compatible server like `vllm bench serve`.

Requests (BENCH.md W3/W4 shapes by default: prompts of 64-2048 tokens, outputs of 16-512,
seeded) are streamed from /v1/completions with `ignore_eos`, arriving as a Poisson process
at `--request-rate` per second (inf: all at once); several rates (`--request-rate 4 16 64
inf`) run one after the other on the same requests. Prompts are seeded random token ids,
different for every request, so no two share a prefix and the prefix cache never helps.
Per request: TTFT (first streamed text), ITL (gaps between streamed chunks), TPOT = (E2E -
TTFT) / (output tokens - 1), and output tokens from the usage chunk. Results (see
headrace/bench/report.py): a JSON file with `vllm bench serve`'s field names per rate, and a
PNG of TTFT, TPOT and throughput against the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec

from headrace.bench.report import plot_sweep, print_sweep, summarize_run, sweep_result

FILLER = (
    "The mill stood by the river, and a channel of cold water ran from the weir to its "
    "wheel. Every morning the miller opened the gate, the water rushed through the "
    "headrace, and the stones began to turn. Farmers brought grain from the valley; "
    "children watched the wheel spin and counted the buckets as they rose and fell. "
)


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int  # asked for
    arrival: float = 0.0  # seconds from the start of the run
    ttft: float = math.nan
    e2e: float = math.nan
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0  # from usage
    error: str | None = None

    @property
    def tpot(self) -> float:
        if self.output_tokens < 2:
            return math.nan
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def add_bench_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("bench serve")
    g.add_argument("--base-url", default="http://127.0.0.1:8000")
    g.add_argument("--model", default=None, help="model name (default: the server's first)")
    g.add_argument("--api-key", default=None)
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="requests/s; several values run a sweep, in order (default inf: all at once)",
    )
    g.add_argument("--max-concurrency", type=int, default=None, help="requests in flight")
    g.add_argument("--input-len", type=int, nargs=2, default=[64, 2048], metavar=("MIN", "MAX"))
    g.add_argument("--output-len", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--workload",
        choices=["W2", "W3"],
        default=None,
        help="prompt and output lengths of `bench throughput --workload` (seeded by --seed), "
        "instead of --input-len / --output-len: the offline run's exact requests",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="0: greedy, as the offline benchmarks sample (default 1.0)",
    )
    g.add_argument("--result-json", default="bench_serve.json")
    g.add_argument("--plot", default="bench_serve.png", help="PNG file ('' for none)")
    g.add_argument("--save-detailed", action="store_true", help="per-request data in the JSON")
    g.add_argument("--measure-pid", type=int, default=None, help="report this PID's CPU time")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument(
        "--client-processes",
        default="auto",
        help="client processes sharing the requests (each every N-th request, at rate / N): "
        "auto = one per 250 requests, at most a quarter of the CPUs",
    )


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _server_info(client: httpx.AsyncClient, model: str | None) -> tuple[str, int, list[int]]:
    models = (await client.get("/v1/models")).raise_for_status().json()["data"]
    card = next((m for m in models if model in (None, m["id"])), None)
    if card is None:
        raise ValueError(f"the server does not serve {model!r}")
    body = {"model": card["id"], "prompt": FILLER * 8, "add_special_tokens": False}
    ids = (await client.post("/tokenize", json=body)).raise_for_status().json()["tokens"]
    return card["id"], int(card["max_model_len"]), ids


def make_requests(args: argparse.Namespace, max_len: int) -> list[RequestResult]:
    """Seeded prompt and output lengths."""
    if getattr(args, "workload", None):
        from headrace.bench.offline import make_workload

        w = make_workload(args.workload, args.num_prompts, args.seed)
        return [
            RequestResult(prompt_len=max(1, min(p, max_len - o)), output_len=o)
            for p, o in zip(
                w.prompt_lens, (min(o, max_len - 1) for o in w.output_lens), strict=True
            )
        ]
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.num_prompts):
        o = min(rng.randint(*args.output_len), max_len - 1)
        p = max(1, min(rng.randint(*args.input_len), max_len - o))
        out.append(RequestResult(prompt_len=p, output_len=o))
    return out


def prompt_ids(vocab: list[int], seed: int, index: int, n: int) -> list[int]:
    """Request `index`'s prompt: `n` token ids drawn from `vocab` (ordinary text tokens, no
    special ones) by a generator seeded with (seed, index): reproducible, and different for
    every request from the first tokens on, so prompts share no prefix."""
    rng = random.Random(f"{seed}/{index}")
    return rng.choices(vocab, k=n)


async def sse_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """The lines of an SSE stream, split at CR / LF only, as the SSE spec says.

    httpx's aiter_lines splits like str.splitlines, also at U+2028, U+0085 and friends,
    which JSON leaves unescaped inside strings: random-token prompts make such text."""
    buf = b""
    async for chunk in resp.aiter_bytes():
        buf += chunk
        *lines, buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            yield line.decode("utf-8")
    if buf:
        yield buf.decode("utf-8")


class _Choice(msgspec.Struct):
    text: str = ""


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Event(msgspec.Struct):
    """The fields of a streamed completion chunk the client reads (the rest is skipped by
    the decoder, unparsed: at 1,000 streams the client parses every token's event)."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | None = None


_decode_event = msgspec.json.Decoder(_Event).decode
_JSON = {"content-type": "application/json"}


def request_body(model: str, r: RequestResult, ids: list[int], temperature: float) -> bytes:
    """The /v1/completions body of one request, encoded before the run starts (drawing and
    encoding 1,000 prompts of ~1k ids inside the run would delay the first requests)."""
    return msgspec.json.encode(
        {
            "model": model,
            "prompt": ids,
            "max_tokens": r.output_len,
            "ignore_eos": True,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )


def request_bodies(
    args: argparse.Namespace,
    model: str,
    vocab: list[int],
    reqs: list[RequestResult],
    indices: list[int],
) -> list[bytes]:
    """The bodies of reqs, whose prompts are request `indices[k]`'s (prompt_ids)."""
    return [
        request_body(model, r, prompt_ids(vocab, args.seed, i, r.prompt_len), args.temperature)
        for i, r in zip(indices, reqs, strict=True)
    ]


async def _one(client: httpx.AsyncClient, r: RequestResult, body: bytes, t0: float) -> None:
    start = time.perf_counter()
    r.arrival = start - t0
    last = start
    try:
        async with client.stream("POST", "/v1/completions", content=body, headers=_JSON) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            async for line in sse_lines(resp):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                try:
                    ev = _decode_event(line[6:])
                except msgspec.MsgspecError as e:
                    r.error = f"bad event {line[:200]!r}: {e}"
                    return
                if ev.error is not None:
                    r.error = str(ev.error.get("message", ev.error))
                    return
                now = time.perf_counter()
                if ev.choices and ev.choices[0].text:
                    if math.isnan(r.ttft):
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last = now
                if ev.usage is not None:
                    r.output_tokens = ev.usage.completion_tokens
        r.e2e = time.perf_counter() - start
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"


def http_client(args: argparse.Namespace) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=None, limits=limits)


async def launch_all(
    client: httpx.AsyncClient,
    reqs: list[RequestResult],
    bodies: list[bytes],
    rate: float,
    max_concurrency: int | None,
    rng: random.Random,
    t0: float,
    on_done: Any = None,
) -> None:
    """Send reqs (Poisson arrivals at `rate`, inf: all at once; at most `max_concurrency`
    in flight) and read their streams to the end; each result is filled in place."""
    gate = asyncio.Semaphore(max_concurrency or len(reqs) or 1)

    async def launch(r: RequestResult, body: bytes) -> None:
        async with gate:
            await _one(client, r, body, t0)
        if on_done is not None:
            on_done()

    tasks = []
    for r, body in zip(reqs, bodies, strict=True):
        tasks.append(asyncio.ensure_future(launch(r, body)))
        if math.isfinite(rate) and rate > 0:
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every rate of `--request-rate`, in order, on the same seeded requests."""
    async with http_client(args) as client:
        model, max_len, filler = await _server_info(client, args.model)
        vocab = sorted(set(filler))
        runs = []
        for rate in args.request_rate:
            reqs = make_requests(args, max_len)
            procs = client_processes(args.client_processes, len(reqs))
            if procs > 1:
                from headrace.bench.serve_procs import run_rate_in_processes

                run = await asyncio.to_thread(
                    run_rate_in_processes, args, model, vocab, reqs, rate, procs
                )
            else:
                run = await _run_rate(args, client, model, vocab, reqs, rate)
            run["client_processes"] = procs
            runs.append(run)
    header = {
        "model": model,
        "base_url": args.base_url,
        "seed": args.seed,
        "input_len": list(args.input_len),
        "output_len": list(args.output_len),
        "workload": args.workload,
        "temperature": args.temperature,
        "request_rates": [r["request_rate"] for r in runs],
    }
    return sweep_result(header, runs)


def client_processes(flag: str, num_requests: int) -> int:
    """--client-processes: a count, or `auto`: one process per 250 requests, at most a
    quarter of the CPUs (at least 1). One Python process parsing every streamed event
    becomes the bottleneck near 1,000 streams (BENCHMARKS.md, the serving gap)."""
    if flag == "auto":
        return max(1, min((os.cpu_count() or 1) // 4, -(-num_requests // 250)))
    try:
        n = int(flag)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--client-processes must be 'auto' or an integer >= 1, got {flag!r}")
    return n


async def _run_rate(
    args: argparse.Namespace,
    client: httpx.AsyncClient,
    model: str,
    vocab: list[int],
    reqs: list[RequestResult],
    rate: float,
) -> dict[str, Any]:
    from tqdm import tqdm

    bodies = request_bodies(args, model, vocab, reqs, list(range(len(reqs))))
    bar = tqdm(total=len(reqs), desc=f"rate {rate}", unit="req", disable=args.no_progress)
    cpu0 = process_cpu_seconds(args.measure_pid) if args.measure_pid else 0.0
    own0 = time.process_time()
    t0 = time.perf_counter()
    rng = random.Random(args.seed + 1)
    await launch_all(client, reqs, bodies, rate, args.max_concurrency, rng, t0, bar.update)
    duration = time.perf_counter() - t0
    bar.close()
    cpu = process_cpu_seconds(args.measure_pid) - cpu0 if args.measure_pid else None
    result = summarize_run(rate, reqs, duration, args.max_concurrency, cpu, args.save_detailed)
    # This client's own CPU seconds in the run: near `duration`, the client (one Python
    # process parsing every SSE event) was the bottleneck, not the server.
    result["client_cpu_s"] = time.process_time() - own0
    return result


def bench_serve_main(args: argparse.Namespace) -> int:
    if any(not (r > 0) for r in args.request_rate):
        raise ValueError(f"--request-rate values must be > 0 (or inf), got {args.request_rate}")
    # A bad value fails here, before any request is sent.
    client_processes(args.client_processes, args.num_prompts)
    result = asyncio.run(run_bench(args))
    Path(args.result_json).write_text(json.dumps(result, indent=1, default=str))
    if args.plot:
        plot_sweep(result, args.plot)
    print_sweep(result)
    return 0 if all(r["failed"] == 0 for r in result["runs"]) else 1
