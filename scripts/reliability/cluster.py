"""Workers and a gateway on 127.0.0.1 for the reliability scripts: fake-engine workers
(worker/fake_engine.py, the llama3 tokenizer; no model) or real ones on stories260K,
ipc:// sockets in a temporary folder, logs there too."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.server_harness import (
    Proc,
    free_port,
    make_chat_model,
    start_gateway,
    start_worker,
    wait_healthy,
)

SHARED = Path(os.environ.get("HEADRACE_SHARED_MODELS", Path(__file__).resolve().parents[3] / "shared" / "models"))  # fmt: skip
MODEL = "fake"  # the name the hostile corpus (tests/test_hostile_input.py) sends


@dataclass
class Cluster:
    base: str
    tmp: Path
    model: Path
    addresses: list[str]
    worker_flags: list[str]
    workers: list[Proc] = field(default_factory=list)
    gateway: Proc | None = None

    def restart_worker(self, i: int) -> None:
        self.workers[i] = start_worker(
            self.model, self.addresses[i], self.tmp, "--served-model-name", MODEL,
            *self.worker_flags,
        )  # fmt: skip

    def gateway_log(self) -> str:
        assert self.gateway is not None
        return self.gateway.log.read_text(errors="replace")


@contextlib.contextmanager
def cluster(
    num_workers: int = 1,
    fake: bool = True,
    worker_flags: tuple[str, ...] = (),
    gateway_flags: tuple[str, ...] = (),
) -> Iterator[Cluster]:
    tmp = Path(tempfile.mkdtemp(prefix="headrace-rel-"))
    if fake:
        model = tmp / "model"
        shutil.copytree(SHARED / "llama3-tokenizer", model)
        flags = ["--fake-engine", *worker_flags]
    else:
        model = make_chat_model(SHARED / "stories260K", tmp / "model")
        flags = list(worker_flags)
    addresses = [f"ipc://{tmp}/w{i}.sock" for i in range(num_workers)]
    c = Cluster("", tmp, model, addresses, flags)
    try:
        for i in range(num_workers):
            c.workers.append(None)  # type: ignore[arg-type]
            c.restart_worker(i)
        port = free_port()
        c.gateway = start_gateway(addresses, port, tmp, *gateway_flags)
        c.base = f"http://127.0.0.1:{port}"
        wait_healthy(c.base, [*c.workers, c.gateway], workers_up=num_workers)
        yield c
    finally:
        for p in [c.gateway, *c.workers]:
            if p is not None:
                p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
