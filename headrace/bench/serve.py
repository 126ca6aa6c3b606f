"""`headrace bench serve`: load a running OpenAI-compatible server like `vllm bench serve`.

Requests (BENCH.md W3/W4 shapes by default: prompts of 64-2048 tokens, outputs of 16-512,
seeded) are streamed from /v1/completions with `ignore_eos`, arriving as a Poisson process
at `--request-rate` per second (inf: all at once). Per request: TTFT (first streamed text),
ITL (gaps between streamed chunks), TPOT = (E2E - TTFT) / (output tokens - 1), and output
tokens from the usage chunk. Reports mean, p50 and p99 of each, request and token
throughput, and (with `--measure-pid`) the CPU seconds that process spent per output
token. Results: a JSON file and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

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
    g.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf)")
    g.add_argument("--max-concurrency", type=int, default=None, help="requests in flight")
    g.add_argument("--input-len", type=int, nargs=2, default=[64, 2048], metavar=("MIN", "MAX"))
    g.add_argument("--output-len", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--result-json", default="bench_serve.json")
    g.add_argument("--plot", default="bench_serve.png", help="PNG file ('' for none)")
    g.add_argument("--measure-pid", type=int, default=None, help="report this PID's CPU time")
    g.add_argument("--no-progress", action="store_true")


def percentiles(values: list[float]) -> dict[str, float]:
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return {"mean": math.nan, "p50": math.nan, "p99": math.nan}

    def pct(p: float) -> float:
        k = (len(vals) - 1) * p / 100
        lo, hi = math.floor(k), math.ceil(k)
        return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)

    return {"mean": sum(vals) / len(vals), "p50": pct(50), "p99": pct(99)}


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


def make_requests(args: argparse.Namespace, max_len: int, ids: list[int]) -> list[RequestResult]:
    """Seeded prompt and output lengths; prompts are slices of tokenized filler text,
    rotated per request so they share no prefix."""
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.num_prompts):
        o = min(rng.randint(*args.output_len), max_len - 1)
        p = max(1, min(rng.randint(*args.input_len), max_len - o))
        out.append(RequestResult(prompt_len=p, output_len=o))
    return out


def prompt_ids(ids: list[int], index: int, n: int) -> list[int]:
    start = (index * 7919) % len(ids)
    reps = (start + n) // len(ids) + 1
    return (ids * (reps + 1))[start : start + n]


async def _one(
    client: httpx.AsyncClient, model: str, r: RequestResult, ids: list[int], t0: float
) -> None:
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": r.output_len,
        "ignore_eos": True,
        "temperature": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    r.arrival = start - t0
    last = start
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    r.error = ev["error"]["message"]
                    return
                now = time.perf_counter()
                if ev["choices"] and ev["choices"][0]["text"]:
                    if math.isnan(r.ttft):
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last = now
                if ev.get("usage"):
                    r.output_tokens = ev["usage"]["completion_tokens"]
        r.e2e = time.perf_counter() - start
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=None, limits=limits
    ) as client:
        model, max_len, filler = await _server_info(client, args.model)
        reqs = make_requests(args, max_len, filler)
        rng = random.Random(args.seed + 1)
        gate = asyncio.Semaphore(args.max_concurrency or len(reqs) or 1)
        bar = tqdm(total=len(reqs), desc="bench serve", unit="req", disable=args.no_progress)
        cpu0 = process_cpu_seconds(args.measure_pid) if args.measure_pid else 0.0
        t0 = time.perf_counter()

        async def launch(i: int, r: RequestResult) -> None:
            async with gate:
                await _one(client, model, r, prompt_ids(filler, i, r.prompt_len), t0)
            bar.update(1)

        tasks = []
        for i, r in enumerate(reqs):
            tasks.append(asyncio.ensure_future(launch(i, r)))
            if math.isfinite(args.request_rate) and args.request_rate > 0:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
        cpu = process_cpu_seconds(args.measure_pid) - cpu0 if args.measure_pid else None
    return summarize(args, model, reqs, duration, cpu)


def summarize(
    args: argparse.Namespace,
    model: str,
    reqs: list[RequestResult],
    duration: float,
    cpu: float | None,
) -> dict[str, Any]:
    ok = [r for r in reqs if r.error is None]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    result: dict[str, Any] = {
        "model": model,
        "base_url": args.base_url,
        "num_prompts": len(reqs),
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "completed": len(ok),
        "failed": len(reqs) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles([r.tpot for r in ok]),
        "itl_s": percentiles([g for r in ok for g in r.itl]),
        "e2e_s": percentiles([r.e2e for r in ok]),
        "errors": sorted({r.error for r in reqs if r.error})[:10],
        "requests": [asdict(r) | {"tpot": r.tpot} for r in reqs],
    }
    if cpu is not None:
        result["measured_pid_cpu_s"] = cpu
        result["measured_pid_cpu_s_per_output_token"] = cpu / max(out_tokens, 1)
    return result


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reqs = [r for r in result["requests"] if r["error"] is None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].scatter([r["arrival"] for r in reqs], [r["ttft"] * 1e3 for r in reqs], s=4)
    axes[0].set(xlabel="arrival (s)", ylabel="TTFT (ms)", title="time to first token")
    for key, ax, title in (("tpot", axes[1], "TPOT"), ("itl", axes[2], "ITL")):
        vals = sorted(
            v * 1e3
            for r in reqs
            for v in (r["itl"] if key == "itl" else [r["tpot"]])
            if not math.isnan(v)
        )
        ax.plot(vals, [i / max(len(vals), 1) for i in range(len(vals))])
        ax.set(xlabel=f"{title} (ms)", ylabel="fraction", title=f"{title} CDF")
    rate = result["request_rate"]
    fig.suptitle(f"{result['model']}: {result['completed']} requests, rate {rate}/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(result: dict[str, Any]) -> None:
    print(f"{'completed / failed':<32}{result['completed']} / {result['failed']}")
    print(f"{'duration (s)':<32}{result['duration_s']:.2f}")
    print(f"{'request throughput (req/s)':<32}{result['request_throughput']:.2f}")
    print(f"{'output throughput (tok/s)':<32}{result['output_throughput']:.1f}")
    print(f"{'total throughput (tok/s)':<32}{result['total_token_throughput']:.1f}")
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        s = result[key]
        print(
            f"{name + ' mean/p50/p99 (ms)':<32}"
            f"{s['mean'] * 1e3:.2f} / {s['p50'] * 1e3:.2f} / {s['p99'] * 1e3:.2f}"
        )
    if "measured_pid_cpu_s" in result:
        per = result["measured_pid_cpu_s_per_output_token"] * 1e6
        print(f"{'measured CPU (s, us/token)':<32}{result['measured_pid_cpu_s']:.2f}, {per:.1f}")
    for e in result["errors"]:
        print(f"error: {e}", file=sys.stderr)


def bench_serve_main(args: argparse.Namespace) -> int:
    result = asyncio.run(run_bench(args))
    Path(args.result_json).write_text(json.dumps(result, indent=1, default=str))
    if args.plot:
        plot(result, args.plot)
    print_summary(result)
    return 0 if result["failed"] == 0 else 1
