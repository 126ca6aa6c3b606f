"""/metrics under vLLM's names after real traffic (worker + gateway on stories260K, n-gram
speculation on so the spec-decode counters move), so vLLM's dashboards work unchanged."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.server_harness import free_port, start_gateway, start_worker, wait_healthy

MODEL = "stories"
# name -> (type, must be > 0 after the traffic below)
EXPECTED = {
    "vllm:num_requests_running": ("gauge", False),
    "vllm:num_requests_waiting": ("gauge", False),
    "vllm:kv_cache_usage_perc": ("gauge", False),
    "vllm:prompt_tokens_total": ("counter", True),
    "vllm:generation_tokens_total": ("counter", True),
    "vllm:num_preemptions_total": ("counter", False),
    "vllm:prefix_cache_queries_total": ("counter", True),
    "vllm:prefix_cache_hits_total": ("counter", True),
    "vllm:spec_decode_num_drafts_total": ("counter", True),
    "vllm:spec_decode_num_draft_tokens_total": ("counter", True),
    "vllm:spec_decode_num_accepted_tokens_total": ("counter", False),
}
HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
)
DASHBOARD = Path(__file__).resolve().parent.parent / "scripts/monitoring/grafana-dashboard.json"
LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$")


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return out


def types(text: str) -> dict[str, str]:
    return dict(
        (parts[2], parts[3])
        for line in text.splitlines()
        if line.startswith("# TYPE ") and len(parts := line.split()) == 4
    )


@pytest.mark.slow
def test_vllm_metric_names_after_traffic(tmp_path: Path, stories_path: Path) -> None:
    address = f"ipc://{tmp_path}/w.sock"
    spec = ("--speculative-method", "ngram", "--num-speculative-tokens", "3")
    worker = start_worker(stories_path, address, tmp_path, "--served-model-name", MODEL, *spec)
    port = free_port()
    gateway = start_gateway([address], port, tmp_path, "--worker-timeout", "5")  # busy CI box
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, [worker, gateway])
        prompt = "Once upon a time, there was a little girl named Lily. " * 3
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0}
        for _ in range(3):  # the same prompt again: prefix-cache hits
            r = httpx.post(f"{base}/v1/completions", json=body | {"ignore_eos": True}, timeout=60)
            assert r.status_code == 200, r.text
        body = {
            "model": MODEL,
            "prompt": "Tom had a dog",
            "max_tokens": 5,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            resp.read()
        # A client that goes away mid-stream: an abort.
        body = {"model": MODEL, "prompt": "Tom", "max_tokens": 300, "stream": True}
        with httpx.stream(
            "POST", f"{base}/v1/completions", json=body | {"ignore_eos": True}
        ) as resp:
            next(resp.iter_lines())
        text = ""
        for _ in range(30):  # worker stats arrive with outputs and heartbeats
            text = httpx.get(f"{base}/metrics", timeout=5).text
            got = samples(text)
            aborted = [v for lb, v in got.get("vllm:request_success_total", [])
                       if lb.get("finished_reason") == "abort"]  # fmt: skip
            drafts = got.get("vllm:spec_decode_num_drafts_total", [({}, 0.0)])[0][1]
            idle = got.get("vllm:num_requests_running", [({}, 1.0)])[0][1] == 0  # abort reached
            if drafts > 0 and aborted and idle:
                break
            time.sleep(0.2)
        got, kinds = samples(text), types(text)
    finally:
        gateway.stop()
        worker.stop()

    for name, (kind, positive) in EXPECTED.items():
        assert name in got, f"{name} missing from /metrics"
        # The TYPE line names a counter with or without _total (prometheus_client versions).
        family = kinds.get(name) or kinds.get(name.removesuffix("_total"))
        assert family == kind, (name, family)
        (labels, value), *rest = got[name]
        assert not rest, f"{name}: one worker, one series"
        assert labels == {"model_name": MODEL, "engine": "0"}, labels
        assert value >= 0 and (value > 0 or not positive), (name, value)
    assert got["vllm:num_requests_running"][0][1] == 0  # all finished
    assert 0 <= got["vllm:kv_cache_usage_perc"][0][1] <= 1
    assert got["vllm:generation_tokens_total"][0][1] >= 3 * 24 + 5
    hits = got["vllm:prefix_cache_hits_total"][0][1]
    assert hits <= got["vllm:prefix_cache_queries_total"][0][1]
    drafts = got["vllm:spec_decode_num_draft_tokens_total"][0][1]
    assert got["vllm:spec_decode_num_accepted_tokens_total"][0][1] <= drafts

    for name in HISTOGRAMS:
        assert kinds.get(name) == "histogram", name
        counts = {lb.get("model_name"): v for lb, v in got[f"{name}_count"]}
        sums = {lb.get("model_name"): v for lb, v in got[f"{name}_sum"]}
        assert counts.get(MODEL, 0) > 0, name
        assert sums[MODEL] >= 0, name
        inf = [v for lb, v in got[f"{name}_bucket"] if lb.get("le") == "+Inf"]
        assert inf == [counts[MODEL]], name
    n = {name: dict((lb["model_name"], v) for lb, v in got[f"{name}_count"]) for name in HISTOGRAMS}
    assert n["vllm:e2e_request_latency_seconds"][MODEL] == 4
    assert n["vllm:time_to_first_token_seconds"][MODEL] == 4
    assert n["vllm:request_queue_time_seconds"][MODEL] == 4
    gen_sum = dict((lb["model_name"], v) for lb, v in got["vllm:request_generation_tokens_sum"])
    assert gen_sum[MODEL] == 3 * 24 + 5
    # ITL: one gap per output after the first, so at most (tokens - 1) per request.
    assert 0 < n["vllm:inter_token_latency_seconds"][MODEL] <= 3 * 23 + 4
    success = {lb["finished_reason"]: v for lb, v in got["vllm:request_success_total"]}
    assert success == {"length": 4.0, "abort": 1.0}
    # Every series the Grafana dashboard queries is exported.
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queried = {
        name
        for p in panels
        for t in p["targets"]
        for name in re.findall(r"vllm:[a-z0-9_]+", t["expr"])
    }
    assert len(queried) >= 15
    assert sorted(queried - set(got)) == []
    ttft_sum = dict((lb["model_name"], v) for lb, v in got["vllm:time_to_first_token_seconds_sum"])
    e2e_sum = dict((lb["model_name"], v) for lb, v in got["vllm:e2e_request_latency_seconds_sum"])
    assert 0 < ttft_sum[MODEL] <= e2e_sum[MODEL]
