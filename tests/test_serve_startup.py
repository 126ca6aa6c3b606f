"""`headrace serve` start-up: progress lines while the worker loads, 503 with a clear message
for requests sent before it is ready, then the start-up time once it is."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.server_harness import Proc, free_port


@pytest.mark.slow
def test_serve_reports_progress_and_503s_until_ready(tmp_path: Path, stories_path: Path) -> None:
    port = free_port()
    args = ["serve", "--model", str(stories_path), "--device", "cpu", "--port", str(port)]
    proc = Proc(args, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    body = {"model": str(stories_path), "prompt": "Once upon a time", "max_tokens": 4}
    early: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.alive(), proc.tail()
            assert time.monotonic() < deadline, f"not ready: {early[-1:]}\n{proc.tail()}"
            try:
                r = httpx.post(f"{base}/v1/completions", json=body, timeout=10)
            except httpx.HTTPError:
                time.sleep(0.05)  # not listening yet
                continue
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text
            early.append(r.json()["error"]["message"])
            time.sleep(0.05)
        # The start-up line follows the first 200 from /health (polled every 0.25 s).
        for _ in range(100):
            ready_log = proc.log.read_text()
            if "start-up took" in ready_log:
                break
            time.sleep(0.05)
    finally:
        proc.stop()
    # The gateway listens while the worker is still importing torch and loading weights.
    assert early, "no request was answered before the worker was ready"
    assert all("server is starting" in m and "try again" in m for m in early), early[:3]
    for line in ("loading weights of", "KV cache:", "serving", "start-up took"):
        assert line in ready_log, (line, ready_log[-2000:])
