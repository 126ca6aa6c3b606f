"""Tensor parallel across real processes on gloo: `headrace generate -tp N` gives TP = 1's
greedy tokens; under `headrace serve -tp 2` a follower killed mid-request fails that
request with an error and serve restarts the group; `serve --data-parallel-size 2` routes
to both of its workers. (The same math with thread ranks: tests/test_tensor_parallel.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ipc.messages import EngineRequest, SamplingParams
from tests.server_harness import REPO, Proc, free_port, make_chat_model, wait_healthy
from tests.tp_models import write_tiny_model
from worker.config import EngineConfig
from worker.engine import EngineCore

pytestmark = pytest.mark.process

PROMPTS = ["Once upon a time", "The little dog"]
MAX_TOKENS = 12


def generate(model: Path, tp: int) -> list[dict]:
    cmd = [sys.executable, "-m", "headrace", "generate", "--model", str(model), "--json"]
    cmd += ["--device", "cpu", "--num-gpu-blocks-override", "64", "--temperature", "0"]
    cmd += ["--max-tokens", str(MAX_TOKENS), "--ignore-eos", "-tp", str(tp)]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


def reference(model: Path, prompts: list[list[int]]) -> list[list[int]]:
    engine = EngineCore(EngineConfig(model=str(model), num_gpu_blocks=64))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompts):
        assert engine.add_request(EngineRequest(str(i), p, params)) is None
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[str(i)] for i in range(len(prompts))]


@pytest.mark.slow  # 1 + 2 + 4 processes importing torch: about 30 s on an idle 2-core box
@pytest.mark.parametrize(
    ("kind", "kv_heads", "vocab"),
    [
        ("llama", 2, 514),  # TP = 4 replicates each KV head on 2 ranks; the vocab pads
        ("qwen2", 4, 512),  # q/k/v biases, tied embeddings
    ],
)
def test_generate_tp_2_and_4_match_tp_1(
    tmp_path: Path, stories_path: Path, kind: str, kv_heads: int, vocab: int
) -> None:
    model = write_tiny_model(
        tmp_path / kind, stories_path, kind, num_kv_heads=kv_heads, vocab_size=vocab
    )
    for tp in (2, 4):
        results = generate(model, tp)
        want = reference(model, [r["prompt_token_ids"] for r in results])
        assert [r["token_ids"] for r in results] == want, (kind, tp)
    assert not list(Path("/dev/shm").glob(f"headrace-ring-{os.getpid()}-*"))


def _children(pid: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(d.name))
    return found


def _followers(serve_pid: int) -> list[int]:
    """Pids of the tensor-parallel followers under serve's worker(s)."""
    return [f for w in _children(serve_pid) for f in _children(w)]


def _stream(base: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 400, "stream": True}
    body |= {"temperature": 0, "ignore_eos": True}
    client = httpx.Client(timeout=60)
    return client.send(
        client.build_request("POST", f"{base}/v1/completions", json=body), stream=True
    )


@pytest.mark.slow  # serve's start-up twice (a gateway, a leader and its follower)
def test_a_killed_follower_fails_its_requests_and_serve_restarts_the_group(
    tmp_path: Path, stories_path: Path
) -> None:
    model = make_chat_model(stories_path, tmp_path / "model")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["serve", "--model", str(model), "--port", str(port), "--device", "cpu", "-tp", "2"]
    args += ["--num-gpu-blocks-override", "256", "--served-model-name", "stories"]
    serve = Proc(args, tmp_path / "serve.log")
    try:
        wait_healthy(base, [serve], timeout=240)
        (follower,) = _followers(serve.popen.pid)
        r = _stream(base, "stories")
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "choices" in first  # the request is running: now kill its follower
        os.kill(follower, signal.SIGKILL)
        rest = list(lines)
        errors = [line for line in rest if '"error"' in line]
        # The leader's own error (not only the gateway's "worker went away") reached it.
        assert errors and "tensor-parallel follower rank 1" in errors[0], rest[-5:]
        # The gateway marks the worker down while serve restarts it with new followers.
        down_seen = False
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                ok = httpx.get(f"{base}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            down_seen |= not ok
            if ok and down_seen:
                break
            time.sleep(0.2)
        assert down_seen, serve.tail()
        wait_healthy(base, [serve], timeout=10)
        new = _followers(serve.popen.pid)
        assert len(new) == 1 and new[0] != follower
        body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 8}
        r2 = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r2.status_code == 200, r2.text
        assert r2.json()["usage"]["completion_tokens"] == 8
    finally:
        serve.stop()
    assert "restarting" in serve.log.read_text()


def test_serve_data_parallel_2_routes_to_both_workers(tmp_path: Path, stories_path: Path) -> None:
    model = make_chat_model(stories_path, tmp_path / "model")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["serve", "--model", str(model), "--port", str(port), "--device", "cpu", "-dp", "2"]
    args += ["--num-gpu-blocks-override", "128", "--served-model-name", "s", "--routing", "session"]
    serve = Proc(args, tmp_path / "serve.log")
    try:
        wait_healthy(base, [serve], timeout=240, workers_up=2)
        assert len(_children(serve.popen.pid)) == 2
        seen = set()
        for i in range(16):  # sessions hash over the two workers' ids
            body = {"model": "s", "prompt": "Hi", "max_tokens": 2, "user": f"session-{i}"}
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-headrace-worker"])
        assert len(seen) == 2, seen
    finally:
        serve.stop()


def test_data_parallel_workers_get_their_groups_gpus() -> None:
    from headrace.serve import worker_gpus

    assert [worker_gpus(i, 1) for i in range(3)] == ["0", "1", "2"]
    assert [worker_gpus(i, 2) for i in range(2)] == ["0,1", "2,3"]
    assert worker_gpus(1, 4) == "4,5,6,7"


FAILING_FOLLOWER = """
import subprocess, sys, time
import headrace.tp_group as tg
from worker.config import EngineConfig
from worker.errors import FatalEngineError

def crash(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])

tg._spawn_follower = crash
t = time.monotonic()
try:
    tg.start_engine(EngineConfig(model=sys.argv[1], device="cpu", tensor_parallel_size=2))
except FatalEngineError as e:
    print(f"{time.monotonic() - t:.1f}", e)
"""


def test_a_follower_that_dies_while_starting_fails_the_start_fast(stories_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", FAILING_FOLLOWER, str(stories_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    took, _, message = out.stdout.strip().partition(" ")
    assert "while starting: tensor-parallel follower rank 1" in message, out.stderr[-2000:]
    assert "exited with status 3" in message
    assert float(took) < 30  # not the rendezvous timeout (120 s)
