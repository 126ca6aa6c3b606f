"""`headrace bench serve`: prompts share no prefix, and a two-rate sweep against a real
server (stories260K) writes vLLM-named JSON fields and the PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from headrace.bench.report import latency_fields
from headrace.bench.serve import prompt_ids
from tests.server_harness import REPO, free_port, start_gateway, start_worker, wait_healthy

pytestmark = pytest.mark.process

VLLM_FIELDS = ["completed", "failed", "request_throughput", "output_throughput",
               "total_token_throughput", "duration", "total_input_tokens",
               "total_output_tokens"] + [
    f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "p99", "std")
]  # fmt: skip


def test_prompts_share_no_prefix_and_are_reproducible() -> None:
    vocab = list(range(100, 160))
    prompts = [prompt_ids(vocab, 0, i, 64) for i in range(500)]
    assert len({tuple(p[:8]) for p in prompts}) == 500  # not even 8 leading tokens shared
    assert prompt_ids(vocab, 0, 7, 64) == prompts[7]
    assert prompt_ids(vocab, 1, 7, 64) != prompts[7]
    assert all(set(p) <= set(vocab) for p in prompts)


def test_client_processes_rule_and_jobs() -> None:
    import argparse
    import os

    from headrace.bench.serve import RequestResult, client_processes
    from headrace.bench.serve_procs import jobs

    quarter = max(1, (os.cpu_count() or 1) // 4)
    assert client_processes("auto", 1000) == min(quarter, 4)
    assert client_processes("auto", 10) == 1
    assert client_processes("5", 10) == 5
    for bad in ("0", "-2", "x", "1.5"):
        with pytest.raises(ValueError, match="--client-processes"):
            client_processes(bad, 10)
    reqs = [RequestResult(prompt_len=10 + i, output_len=i + 1) for i in range(7)]
    args = argparse.Namespace(
        base_url="u", api_key=None, seed=3, temperature=0.0, max_concurrency=5
    )
    js = jobs(args, "m", [1, 2], reqs, 6.0, 3)
    # Every request exactly once, its own index (so its own prompt), rate and limit shared.
    assert sorted(i for j in js for i in j["indices"]) == list(range(7))
    assert js[1]["indices"] == [1, 4] and js[1]["lens"] == [[11, 2], [14, 5]]
    assert {j["rate"] for j in js} == {2.0} and {j["max_concurrency"] for j in js} == {2}
    assert len({j["rng_seed"] for j in js}) == 3
    args.max_concurrency = None
    assert jobs(args, "m", [1], reqs, float("inf"), 2)[0]["max_concurrency"] is None


def test_latency_fields_are_vllm_named_milliseconds() -> None:
    f = latency_fields("ttft", [0.001, 0.002, 0.003, float("nan")])
    assert f["mean_ttft_ms"] == pytest.approx(2.0)
    assert f["median_ttft_ms"] == pytest.approx(2.0)
    assert f["p99_ttft_ms"] == pytest.approx(2.98)


@pytest.mark.slow
@pytest.mark.parametrize("procs", ["1", "3"])
def test_bench_serve_sweep_against_a_server(tmp_path: Path, stories_path: Path, procs: str) -> None:
    address = f"ipc://{tmp_path}/w.sock"
    worker = start_worker(stories_path, address, tmp_path)
    port = free_port()
    gateway = start_gateway([address], port, tmp_path, "--worker-timeout", "5")  # busy CI box
    out_json, out_png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    try:
        wait_healthy(f"http://127.0.0.1:{port}", [worker, gateway])
        cmd = [
            sys.executable, "-m", "headrace", "bench", "serve",
            "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "6",
            "--request-rate", "20", "inf", "--input-len", "8", "32", "--output-len", "4", "12",
            "--result-json", str(out_json), "--plot", str(out_png), "--no-progress",
            "--client-processes", procs,
        ]  # fmt: skip
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        gateway.stop()
        worker.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out_json.read_text())
    assert result["request_rates"] == [20.0, "inf"]
    assert [r["request_rate"] for r in result["runs"]] == [20.0, "inf"]
    for r in result["runs"]:
        missing = [f for f in VLLM_FIELDS if f not in r]
        assert not missing, missing
        assert (r["completed"], r["failed"]) == (6, 0)
        assert 0 < r["median_ttft_ms"] <= r["p99_ttft_ms"] <= r["mean_e2el_ms"] * 6
        assert r["mean_tpot_ms"] > 0 and r["output_throughput"] > 0
        assert r["total_output_tokens"] >= 6 * 4
        assert r["client_processes"] == int(procs) and r["client_cpu_s"] > 0
    assert "mean_ttft_ms" not in result  # several rates: only under "runs"
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TTFT mean/p99 ms" in run.stdout


def test_sse_lines_split_at_newlines_only() -> None:
    # JSON leaves U+2028 / U+0085 unescaped; httpx's aiter_lines would split there (as
    # str.splitlines does) and hand the client half a JSON object.
    import asyncio
    import json

    import httpx

    from headrace.bench.serve import sse_lines

    events = [{"text": "a\u2028b\u0085c"}, {"text": "d"}]
    body = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\r\n\r\n" for e in events).encode()

    async def chunks():  # 7-byte pieces: splits inside characters and inside CRLF
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    async def lines() -> list[str]:
        resp = httpx.Response(200, content=chunks())
        return [line async for line in sse_lines(resp)]

    got = [json.loads(line[6:]) for line in asyncio.run(lines()) if line.startswith("data: ")]
    assert got == events


def test_bad_client_processes_fails_before_any_request() -> None:
    # Port 9 (discard) on localhost: nothing listens, so reaching the network would be an
    # httpx connection error, not this message.
    cmd = [sys.executable, "-m", "headrace", "bench", "serve", "--base-url", "http://127.0.0.1:9",
           "--client-processes", "0", "--plot", "", "--no-progress"]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "--client-processes must be 'auto' or an integer >= 1, got '0'" in run.stderr
