"""Overload control (the worker's queue limits -> 429 with Retry-After, the queue-wait
deadline -> 503), graceful drain on SIGTERM for gateway and worker, and a model's
generation_config defaults. Fake-engine workers: no model, milliseconds per step."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from pathlib import Path

import httpx
import pytest

from gateway.protocol import CompletionRequest
from gateway.sampling_params import build_params
from tests.server_harness import Proc, free_port, start_gateway, start_worker, wait_healthy

pytestmark = pytest.mark.reliability
MODEL = "fake"


def fake_model(tmp: Path, generation_config: dict | None = None) -> Path:
    from tests.conftest import LLAMA3_TOKENIZER

    model = tmp / "model"
    shutil.copytree(LLAMA3_TOKENIZER, model)
    if generation_config is not None:
        (model / "generation_config.json").write_text(json.dumps(generation_config))
    return model


def start(tmp: Path, worker_flags: list[str], gateway_flags: list[str] = (), model: Path | None = None):  # type: ignore[no-untyped-def,assignment]  # fmt: skip
    model = model or fake_model(tmp)
    address = f"ipc://{tmp}/w.sock"
    worker = start_worker(model, address, tmp, "--fake-engine", "--served-model-name", MODEL,
                          *worker_flags)  # fmt: skip
    port = free_port()
    gateway = start_gateway([address], port, tmp, *gateway_flags)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, [worker, gateway])
    return base, worker, gateway


def stop(*procs: Proc) -> None:
    for p in procs:
        p.stop()


def body(max_tokens: int, stream: bool = False) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": max_tokens, "stream": stream}


def test_queue_limits_give_429_with_retry_after(tmp_path: Path) -> None:
    base, worker, gateway = start(
        tmp_path, ["--max-num-seqs", "1", "--fake-step-ms", "20", "--max-num-queued-reqs", "2"]
    )
    try:

        async def run() -> tuple[list[int], httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                running = asyncio.ensure_future(c.post("/v1/completions", json=body(60)))
                await asyncio.sleep(0.3)
                queued = [
                    asyncio.ensure_future(c.post("/v1/completions", json=body(2))) for _ in range(2)
                ]
                await asyncio.sleep(0.4)  # queued, and a heartbeat told the gateway
                refused = await c.post("/v1/completions", json=body(2))
                refused_stream = await c.post("/v1/completions", json=body(2, stream=True))
                done = await asyncio.gather(running, *queued)
                return [r.status_code for r in done], refused, refused_stream

        statuses, refused, refused_stream = asyncio.run(run())
        assert statuses == [200, 200, 200]
        for r in (refused, refused_stream):
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and "--max-num-queued-reqs" in err["message"]
        h = httpx.get(f"{base}/health").json()["workers"][0]
        assert h["num_running"] == 0
    finally:
        stop(gateway, worker)


def test_queue_wait_deadline_is_a_clear_error(tmp_path: Path) -> None:
    base, worker, gateway = start(
        tmp_path, ["--max-num-seqs", "1", "--fake-step-ms", "20", "--max-queue-wait", "0.3"]
    )
    try:

        async def run() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                running = asyncio.ensure_future(c.post("/v1/completions", json=body(50)))
                await asyncio.sleep(0.2)
                late = await c.post("/v1/completions", json=body(2))
                return await running, late

        running, late = asyncio.run(run())
        assert running.status_code == 200
        assert late.status_code == 503, late.text
        assert "--max-queue-wait" in late.json()["error"]["message"]
    finally:
        stop(gateway, worker)


def _stream_lines(base: str, max_tokens: int) -> list[str]:
    with httpx.stream("POST", f"{base}/v1/completions", json=body(max_tokens, True), timeout=60) as r:  # fmt: skip
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("target", ["gateway", "worker"])
def test_sigterm_drains(tmp_path: Path, target: str) -> None:
    base, worker, gateway = start(
        tmp_path, ["--fake-step-ms", "20", "--shutdown-timeout", "20"], ["--shutdown-timeout", "20"]
    )
    proc = gateway if target == "gateway" else worker
    try:

        async def run() -> tuple[list[str], httpx.Response]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                stream = asyncio.ensure_future(asyncio.to_thread(_stream_lines, base, 80))
                await asyncio.sleep(0.4)  # the stream is running: 80 tokens take 1.6 s
                proc.popen.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                late = await c.post("/v1/completions", json=body(2))
                return await stream, late

        lines, late = asyncio.run(run())
        assert lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)
        assert sum('"text"' in x for x in lines) == 80  # every token, none cut
        assert late.status_code == 503, late.text
        assert "shutting down" in late.json()["error"]["message"]
        assert proc.popen.wait(10) == 0
    finally:
        stop(gateway, worker)


def test_generation_config_defaults(tmp_path: Path) -> None:
    model = fake_model(tmp_path, {"temperature": 0.3, "top_k": 5, "max_new_tokens": 7})
    base, worker, gateway = start(tmp_path, [], model=model)
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=30).json()
        assert r["usage"]["completion_tokens"] == 7
        r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi"}).json()
        assert r["usage"]["completion_tokens"] == 7
        r = httpx.post(f"{base}/v1/completions", json=body(3)).json()
        assert r["usage"]["completion_tokens"] == 3  # the request's own value wins
    finally:
        stop(gateway, worker)
    (tmp_path / "vllm").mkdir()
    base, worker, gateway = start(tmp_path / "vllm", ["--generation-config", "vllm"], model=model)
    try:
        r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi"}).json()
        assert r["usage"]["completion_tokens"] == 16  # OpenAI's default, the file ignored
    finally:
        stop(gateway, worker)


def test_build_params_takes_unset_fields_from_the_model() -> None:
    import msgspec

    defaults = {"temperature": 0.3, "top_p": 0.9, "top_k": 5, "repetition_penalty": 1.1}
    req = msgspec.json.decode(
        b'{"model": "m", "prompt": "x", "top_p": 0.5}', type=CompletionRequest
    )
    p = build_params(req, None, None, 20, defaults=defaults | {"max_tokens": 9})
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (
        0.3, 0.5, 5, 1.1, 9,
    )  # fmt: skip
    assert build_params(req, 4, None, 20, defaults={"max_tokens": 9}).max_tokens == 4
    assert build_params(req, None, None, 20, defaults={}).temperature == 1.0
