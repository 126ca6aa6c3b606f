"""Speculative decoding through the server: its counters and mean accepted length on /metrics."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server_harness import free_port, metric, start_gateway, start_worker, wait_healthy

pytestmark = pytest.mark.process


def test_spec_decode_metrics_on_metrics_endpoint(tmp_path):
    from tests.conftest import STORIES

    if not (STORIES / "config.json").exists():
        pytest.skip(f"stories260K not found at {STORIES}")
    address = f"ipc://{tmp_path}/spec.sock"
    worker = start_worker(
        STORIES, address, tmp_path, "--speculative-method", "ngram", "--num-speculative-tokens", "3"
    )
    port = free_port()
    gateway = start_gateway([address], port, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, [worker, gateway])
        # A prompt that repeats itself gives the n-gram proposer something to match.
        prompt = "Once upon a time, there was a little girl named Lily. " * 3
        body = {"model": str(STORIES), "prompt": prompt, "max_tokens": 40, "temperature": 0}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        reported = False
        for _ in range(30):  # stats travel with outputs and heartbeats
            if metric(base, "headrace:spec_decode_num_verify_steps_total") > 0:
                reported = True
                break
            time.sleep(0.2)
        assert reported, "no verification steps reported"
        proposed = metric(base, "headrace:spec_decode_num_draft_tokens_total")
        accepted = metric(base, "headrace:spec_decode_num_accepted_tokens_total")
        steps = metric(base, "headrace:spec_decode_num_verify_steps_total")
        mean = metric(base, "headrace:spec_decode_mean_accepted_length")
        assert proposed >= accepted >= 0 and proposed > 0
        assert mean == pytest.approx(1 + accepted / steps)
    finally:
        gateway.stop()
        worker.stop()
