"""Real worker and gateway processes for the server tests: ephemeral ports on 127.0.0.1,
ipc:// sockets in temporary folders, logs in files that a failing test prints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent

# A tiny ChatML-like template so the 260K-parameter stories model can take chat requests.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_chat_model(stories: Path, dest: Path) -> Path:
    """stories260K copied into `dest` with a chat template added (never into the repo)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(stories / name, dest / name)
    config = json.loads((stories / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process whose output goes to a log file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        # One torch thread: on a loaded 2-core CI machine, OpenMP threads spinning at
        # barriers make each tiny-model step 10-20x slower.
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self._log_file = log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "headrace", "--log-level", "INFO", *args],
            cwd=REPO,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_worker(model: Path, address: str, log_dir: Path, *extra: str) -> Proc:
    args = ["worker", "--model", str(model), "--bind", address, "--device", "cpu"]
    args += ["--num-gpu-blocks-override", "1024", "--max-num-batched-tokens", "2048", *extra]
    name = address.rsplit("/", 1)[-1].replace(".sock", "")
    return Proc(args, log_dir / f"worker-{name}.log")


def start_gateway(workers: list[str], port: int, log_dir: Path, *extra: str) -> Proc:
    args = ["gateway", "--port", str(port), "--worker-timeout", "0.5"]
    for w in workers:
        args += ["--worker", w]
    return Proc([*args, *extra], log_dir / f"gateway-{port}.log")


def wait_healthy(base: str, procs: list[Proc], timeout: float = 60.0, workers_up: int = 1) -> None:
    """Until /health is 200 with `workers_up` workers up; fails with the logs otherwise."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.args[0]} exited:\n{p.tail()}")
        try:
            r = httpx.get(f"{base}/health", timeout=2)
            last = r.text
            if r.status_code == 200:
                up = sum(w["state"] == "up" for w in r.json()["workers"])
                if up >= workers_up:
                    return
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.log.name}\n{p.tail()}" for p in procs)
    raise TimeoutError(f"not healthy after {timeout} s: {last}\n{logs}")


def health(base: str) -> dict:
    return httpx.get(f"{base}/health", timeout=5).json()


def metric(base: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    found = False
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, value = line.rsplit(" ", 1)
        if key != name and not key.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += float(value)
            found = True
    if not found:
        raise KeyError(name)
    return total
