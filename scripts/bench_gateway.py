"""How many streamed tokens per second can ONE gateway process deliver, and how much CPU
does it spend per token? (BENCHMARKS.md, "## Gateway (CPU)".)

Starts, on 127.0.0.1, one `headrace worker --fake-engine` (worker/fake_engine.py: no model,
one token per running request per step, so the worker is not the bottleneck) and one
`headrace gateway`, then for each concurrency C runs a closed-loop load: C clients, each
streaming /v1/completions (`ignore_eos`, `max_tokens` = --output-len) back to back on one
keep-alive connection. The first request of each client asks for a random 1..output-len
tokens so the clients do not finish in lockstep. After --warmup seconds, a --duration
second window measures: delivered tokens/s (streamed token events received), the CPU seconds
of the gateway, worker and client processes (/proc/PID/stat) per delivered token and as a
fraction of one core, and TTFT / TPOT / ITL of the requests that started in the window.
Every request must end with [DONE], with usage.completion_tokens equal to the token events
received and to max_tokens.

The client is a lean raw-socket HTTP/1.1 client on uvloop (it counts SSE events with
bytes.count and parses only the usage chunk), because the client shares this machine's
CPUs; `headrace bench serve` (httpx + json per event) costs more per token. With
--pin (default when there are >= 2 CPUs) the gateway runs on CPU 0 alone and the worker and
the client share CPU 1 (`taskset`), so the gateway's limit is one core.

    python scripts/bench_gateway.py --concurrency 32 128 256 512 --output-len 256 \
        --fake-step-ms 10 --json gateway_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = REPO.parent / "shared" / "models" / "llama3-tokenizer"
PROMPT = (
    "The mill stood by the river, and a channel of cold water ran from the weir to its "
    "wheel. Every morning the miller opened the gate and the stones began to turn. "
    "Tell me what the miller saw on the day the river froze."
)
TOKEN_EVENT = b'"choices":[{'  # every streamed choice chunk; the usage chunk has "choices":[]
DONE = b"data: [DONE]"
USAGE = re.compile(rb'"completion_tokens":(\d+)')
CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def pct(vals: list[float], p: float) -> float:
    vals = sorted(vals)
    if not vals:
        return math.nan
    k = (len(vals) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def stats_ms(vals: list[float]) -> dict[str, float]:
    if not vals:
        return {"mean": math.nan, "p50": math.nan, "p99": math.nan}
    return {
        "mean": 1e3 * sum(vals) / len(vals),
        "p50": 1e3 * pct(vals, 50),
        "p99": 1e3 * pct(vals, 99),
    }


# ----------------------------------------------------------------------------- client


class Load:
    """Shared counters of one closed-loop run."""

    def __init__(self) -> None:
        self.tokens = 0  # token events received so far
        self.measuring = False
        self.stop = False
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        self.itl: list[float] = []
        self.requests = 0
        self.errors: list[str] = []


async def one_request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    model: str,
    max_tokens: int,
    load: Load,
) -> None:
    body = json.dumps(
        {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 1.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    in_window = load.measuring
    start = time.perf_counter()
    writer.write(head + body)
    status = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in status.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"HTTP error: {status[:200]!r}")
    carry = b""
    last_bytes = b""
    n = 0
    first = last = math.nan
    gaps: list[float] = []
    done = False
    while True:
        data = await reader.read(1 << 16)
        if not data:
            raise RuntimeError("connection closed mid-stream")
        now = time.perf_counter()
        seg = carry + data
        k = seg.count(TOKEN_EVENT)
        carry = seg[-(len(TOKEN_EVENT) - 1) :]
        last_bytes = (last_bytes + data)[-4096:]
        if k:
            if n == 0:
                first = now
                gaps.extend([0.0] * (k - 1))
            else:
                gaps.append(now - last)
                gaps.extend([0.0] * (k - 1))
            last = now
            n += k
            if load.measuring:
                load.tokens += k
        if not done and DONE in last_bytes:
            done = True
        if done and last_bytes.endswith(b"0\r\n\r\n"):  # the chunked body's last chunk
            break
    if b'"error"' in last_bytes:
        raise RuntimeError(f"error event: {last_bytes[-300:]!r}")
    m = USAGE.findall(last_bytes)
    usage = int(m[-1]) if m else -1
    if usage != n or n != max_tokens:
        raise RuntimeError(f"{n} token events, usage {usage}, max_tokens {max_tokens}")
    load.requests += 1
    if in_window and load.measuring:
        load.ttft.append(first - start)
        if n > 1:
            load.tpot.append((last - first) / (n - 1))
        load.itl.extend(gaps)


async def client_loop(port: int, model: str, output_len: int, rng: random.Random, load: Load):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    max_tokens = rng.randint(1, output_len)  # desynchronize the clients
    try:
        while not load.stop:
            try:
                await one_request(reader, writer, model, max_tokens, load)
            except Exception as e:
                load.errors.append(f"{type(e).__name__}: {e}")
                return
            max_tokens = output_len
    finally:
        writer.close()


async def run_load(args: argparse.Namespace) -> dict:
    load = Load()
    concurrency = args.concurrency[0]
    rng = random.Random(args.seed)
    pids = {"gateway": args.gateway_pid, "worker": args.worker_pid, "client": os.getpid()}
    tasks = [
        asyncio.ensure_future(client_loop(args.port, args.model, args.output_len, rng, load))
        for _ in range(concurrency)
    ]
    await asyncio.sleep(args.warmup)
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.perf_counter()
    load.measuring = True
    await asyncio.sleep(args.duration)
    load.measuring = False
    t1 = time.perf_counter()
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
    tokens = load.tokens
    load.stop = True
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.drain_timeout)
    window = t1 - t0
    cpu = {k: cpu1[k] - cpu0[k] for k in pids}
    return {
        "concurrency": concurrency,
        "output_len": args.output_len,
        "window_s": window,
        "tokens": tokens,
        "tok_per_s": tokens / window,
        "cpu_s": cpu,
        "cores_used": {k: v / window for k, v in cpu.items()},
        "cpu_us_per_token": {k: 1e6 * v / max(tokens, 1) for k, v in cpu.items()},
        "requests_completed": load.requests,
        "errors": load.errors[:10],
        "num_errors": len(load.errors),
        "ttft_ms": stats_ms(load.ttft),
        "tpot_ms": stats_ms(load.tpot),
        "itl_ms": stats_ms(load.itl),
    }


def client_main(args: argparse.Namespace) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run_load(args))))


# ----------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpus: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus is not None else argv


def wait_healthy(port: int, procs: list[subprocess.Popen], timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args!r} exited with {p.returncode}")
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if r.status_code == 200 and any(w["state"] == "up" for w in r.json()["workers"]):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("gateway not healthy")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def driver_main(args: argparse.Namespace) -> int:
    ncpu = len(os.sched_getaffinity(0))
    pin = args.pin if args.pin is not None else (ncpu >= 2 and shutil.which("taskset"))
    gw_cpus, rest_cpus = ("0", "1") if pin else (None, None)
    tok = str(args.tokenizer)
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    port, zport = free_port(), free_port()
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    headrace = [sys.executable, "-m", "headrace", "--log-level", "WARNING"]
    worker_cmd = pinned(
        rest_cpus,
        [
            *headrace,
            "worker",
            "--fake-engine",
            "--fake-step-ms",
            str(args.fake_step_ms),
            "--model",
            tok,
            "--max-num-seqs",
            str(args.max_num_seqs),
            "--bind",
            f"tcp://127.0.0.1:{zport}",
        ],
    )
    profile = ["-m", "cProfile", "-o", args.gateway_profile] if args.gateway_profile else []
    gateway_cmd = pinned(
        gw_cpus,
        [
            sys.executable,
            *profile,
            *headrace[1:],
            "gateway",
            "--worker",
            f"tcp://127.0.0.1:{zport}",
            "--port",
            str(port),
            *args.gateway_arg,
        ],
    )
    procs = []
    results = []
    try:
        with open(logs / "worker.log", "wb") as wl, open(logs / "gateway.log", "wb") as gl:
            worker = subprocess.Popen(worker_cmd, cwd=REPO, env=env, stdout=wl, stderr=wl)
            procs.append(worker)
            gateway = subprocess.Popen(gateway_cmd, cwd=REPO, env=env, stdout=gl, stderr=gl)
            procs.append(gateway)
            wait_healthy(port, procs)
            import httpx

            model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
            print(f"# worker: {' '.join(worker_cmd)}", flush=True)
            print(f"# gateway: {' '.join(gateway_cmd)}", flush=True)
            print(
                f"# cpus: {ncpu}, pinned: {bool(pin)}, fake step {args.fake_step_ms} ms", flush=True
            )
            hdr = (
                f"{'C':>5} {'tok/s':>8} {'gw us/tok':>10} {'gw cores':>9} {'wk us/tok':>10} "
                f"{'wk cores':>9} {'cl us/tok':>10} {'cl cores':>9} {'TTFT p50/p99 ms':>17} "
                f"{'TPOT p50 ms':>12} {'ITL p99 ms':>11} {'err':>4}  load"
            )
            print(hdr, flush=True)
            for rep in range(args.repeat):
                for c in args.concurrency:
                    la_before = loadavg()
                    client_cmd = pinned(
                        rest_cpus,
                        [
                            sys.executable,
                            __file__,
                            "--client",
                            "--port",
                            str(port),
                            "--model",
                            model,
                            "--concurrency",
                            str(c),
                            "--output-len",
                            str(args.output_len),
                            "--warmup",
                            str(args.warmup),
                            "--duration",
                            str(args.duration),
                            "--seed",
                            str(args.seed + rep),
                            "--gateway-pid",
                            str(gateway.pid),
                            "--worker-pid",
                            str(worker.pid),
                        ],
                    )
                    out = subprocess.run(
                        client_cmd,
                        cwd=REPO,
                        env=env,
                        capture_output=True,
                        check=False,
                        timeout=args.warmup + args.duration + 300,
                    )
                    if out.returncode != 0:
                        print(out.stderr.decode()[-2000:], file=sys.stderr)
                        return 1
                    r = json.loads(out.stdout.decode().strip().splitlines()[-1])
                    r.update(
                        repeat=rep,
                        loadavg_before=la_before,
                        loadavg_after=loadavg(),
                        fake_step_ms=args.fake_step_ms,
                        pinned=bool(pin),
                    )
                    results.append(r)
                    u, k = r["cpu_us_per_token"], r["cores_used"]
                    print(
                        f"{c:>5} {r['tok_per_s']:>8.0f} {u['gateway']:>10.1f} "
                        f"{k['gateway']:>9.2f} {u['worker']:>10.1f} {k['worker']:>9.2f} "
                        f"{u['client']:>10.1f} {k['client']:>9.2f} "
                        f"{r['ttft_ms']['p50']:>8.1f}/{r['ttft_ms']['p99']:<8.1f} "
                        f"{r['tpot_ms']['p50']:>12.2f} {r['itl_ms']['p99']:>11.1f} "
                        f"{r['num_errors']:>4}  {r['loadavg_after']}",
                        flush=True,
                    )
                    for e in r["errors"]:
                        print(f"error: {e}", file=sys.stderr)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["num_errors"] == 0 for r in results) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[32, 128, 256, 512])
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before the window")
    p.add_argument("--duration", type=float, default=10.0, help="measured window (s)")
    p.add_argument("--repeat", type=int, default=1, help="sweep this many times")
    p.add_argument(
        "--fake-step-ms", type=float, default=10.0, help="the fake worker's step time (10)"
    )
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="folder with tokenizer.json")
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gateway on CPU 0, worker and client on CPU 1 (default: if >= 2 CPUs)",
    )
    p.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag")
    p.add_argument(
        "--gateway-profile",
        default=None,
        help="run the gateway under cProfile, writing its stats to this file at exit",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every row here")
    p.add_argument("--log-dir", default="/tmp/bench_gateway_logs")
    # the client subprocess
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--gateway-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--drain-timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        client_main(args)
        return 0
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
