"""The benchmarking engine (worker/fake_engine.py): its step contract in process, and
`headrace worker --fake-engine` behind a real gateway with concurrent streams."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from ipc.messages import EngineRequest, FinishReason, SamplingParams
from tests.server_harness import free_port, start_gateway, start_worker, wait_healthy
from worker.config import EngineConfig
from worker.fake_engine import FakeEngineCore


def test_fake_engine_steps(stories_path: Path) -> None:
    eng = FakeEngineCore(EngineConfig(model=str(stories_path), max_num_seqs=2))
    assert eng.model_info.vocab_size == 512
    assert eng.model_info.max_model_len == 512  # config.json's max_position_embeddings
    assert eng.model_info.tokenizer == str(stories_path)
    for i, n in enumerate((3, 1, 2)):
        rejected = eng.add_request(EngineRequest(f"r{i}", [1, 5], SamplingParams(max_tokens=n)))
        assert rejected is None
    bad = eng.add_request(EngineRequest("bad", [9999], SamplingParams()))
    assert bad is not None and bad.finish_reason == FinishReason.ERROR
    tokens: dict[str, list[int]] = {}
    finished = []
    steps = 0
    while eng.has_unfinished_requests():
        outs = eng.step()
        steps += 1
        assert len(outs) <= 2  # max_num_seqs
        for o in outs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason is not None:
                assert o.finish_reason == FinishReason.LENGTH
                finished.append(o.request_id)
    assert sorted(finished) == ["r0", "r1", "r2"]
    assert {k: len(v) for k, v in tokens.items()} == {"r0": 3, "r1": 1, "r2": 2}
    assert tokens["r2"] == tokens["r0"][:2]  # deterministic: the same fixed text
    assert steps == 3
    assert eng.stats().generation_tokens == 6


@pytest.mark.process
def test_fake_worker_behind_gateway(tmp_path: Path, llama3_tokenizer_path: Path) -> None:
    address = f"ipc://{tmp_path}/fake.sock"
    worker = start_worker(
        llama3_tokenizer_path, address, tmp_path, "--fake-engine", "--fake-step-ms", "2"
    )
    port = free_port()
    gateway = start_gateway([address], port, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, [worker, gateway])
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]

        async def stream(c: httpx.AsyncClient, i: int) -> tuple[int, int, bool, str]:
            body = {
                "model": model,
                "prompt": f"request {i}",
                "max_tokens": 40,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            chunks, usage, done, text = 0, -1, False, ""
            async with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        ev = json.loads(line[6:])
                        assert "error" not in ev
                        if ev["choices"]:
                            chunks += 1
                            text += ev["choices"][0]["text"]
                        if ev.get("usage"):
                            usage = ev["usage"]["completion_tokens"]
            return chunks, usage, done, text

        async def run() -> list[tuple[int, int, bool, str]]:
            limits = httpx.Limits(max_connections=None)
            async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as c:
                return await asyncio.gather(*(stream(c, i) for i in range(64)))

        results = asyncio.run(run())
        assert all(r[:3] == (40, 40, True) for r in results), results[:3]
        assert len({r[3] for r in results}) == 1
        assert results[0][3].startswith("The mill stood by the river")
    finally:
        gateway.stop()
        worker.stop()
