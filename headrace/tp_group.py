"""Starting an engine, and for `tensor_parallel_size` N > 1 its whole group of processes.

Every command that starts an engine (worker, generate, bench, the offline `LLM`) goes
through `start_engine`. With N > 1 this process becomes the leader (rank 0) and starts N-1
followers (`python -m headrace.tp_follower`, one per GPU):

    leader (this process)                       follower r = 1 .. N-1
      check the model splits N ways
      TCPStore on a free port, ring in /dev/shm
      spawn the followers  -------------------> join the group (store port), attach to
                                                the ring as reader r-1
      join the group (gloo on CPU, NCCL on GPU)
      EngineCore: load shard, size KV cache,    EngineCore: the same, collective for
      capture graphs                            collective
      publish every step into the ring  ------> run it (worker/parallel/follower.py)
      at exit: close the ring  ---------------> exit 0

A follower that dies fails the leader's requests and the leader exits (in a worker) so
that `headrace serve` restarts the group; followers exit when the leader does.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from worker.config import EngineConfig
from worker.errors import FatalEngineError

log = logging.getLogger(__name__)
RING_SLOT_BYTES = 1 << 20  # most steps fit; a long prefill's batch overflows to its own segment
RING_SLOTS = 8
# A worker whose follower died exits on its own once its engine thread sees it; if that
# thread is stuck (an NCCL collective that will never finish), this long after, it is forced.
FORCED_EXIT_AFTER_S = 10.0

if TYPE_CHECKING:  # importing the engine pulls in torch: done when an engine starts
    from torch.distributed import Store

    from worker.engine import EngineCore
    from worker.parallel.leader import LeaderLink


def check_model_splits(config: EngineConfig) -> None:
    """ValueError before any process starts when the model cannot be split N ways."""
    from ipc.model_folder import open_model
    from worker.model_config import ModelConfig
    from worker.parallel.plan import check_checkpoint_splits, check_tensor_parallel

    files = open_model(config.model, config.load_format)
    mc = ModelConfig.from_hf(files.config, source=files.path)
    check_tensor_parallel(mc, config.tensor_parallel_size, files.path)
    check_checkpoint_splits(
        files.config, config.quantization, config.tensor_parallel_size, files.path
    )


def start_engine(
    config: EngineConfig, *, exit_on_failure: bool = False, ring_slot_bytes: int = RING_SLOT_BYTES
) -> EngineCore:
    """An EngineCore; with tensor_parallel_size > 1 the leader of a started group.

    exit_on_failure (a worker process): if a follower dies and the engine thread cannot
    report it within FORCED_EXIT_AFTER_S, exit the process anyway.
    """
    from worker.engine import EngineCore
    from worker.parallel.engine import TpEngineCore

    if config.tensor_parallel_size == 1:
        return EngineCore(config)
    check_model_splits(config)
    link, store = _start_followers(config, ring_slot_bytes, exit_on_failure)
    try:
        _join(link, store)
        engine = TpEngineCore(config, link.group)
    except BaseException:
        link.close(timeout=2.0)
        raise
    link.attach(engine.runner)
    atexit.register(link.close)
    log.info("tensor-parallel group of %d ranks ready (followers %s)", config.tensor_parallel_size,
             ", ".join(str(p.pid) for p in link.followers))  # fmt: skip
    return engine


def _start_followers(
    config: EngineConfig, ring_slot_bytes: int, exit_on_failure: bool
) -> tuple[LeaderLink, Store]:
    """The store, the ring and the follower processes, watched from now on."""
    import torch

    from ipc.shm_ring import ShmRingWriter
    from worker.model_loader import resolve_device
    from worker.parallel.leader import LeaderLink
    from worker.parallel.state import TpGroup, make_store, rank_device

    size = config.tensor_parallel_size
    device = rank_device(resolve_device(config.device).type, 0)
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(
            f"tensor_parallel_size {size} needs {size} GPUs, {torch.cuda.device_count()} "
            "visible (CUDA_VISIBLE_DEVICES)"
        )
    env = dict(os.environ)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in env:
        # N ranks share the cores: N x all-cores OpenMP threads would thrash at barriers.
        threads = max(1, (os.cpu_count() or 1) // size)
        torch.set_num_threads(threads)
        env["OMP_NUM_THREADS"] = str(threads)
    store = make_store(size)
    ring = ShmRingWriter(size - 1, num_slots=RING_SLOTS, slot_bytes=ring_slot_bytes)
    procs = [_spawn_follower(config, r, store.port, str(ring.path), env) for r in range(1, size)]
    group = TpGroup(0, size, device)
    return LeaderLink(group, ring, procs, _force_exit if exit_on_failure else None), store


def _join(link: LeaderLink, store: Store) -> None:
    """Join the group, unless a follower dies first: the rendezvous would wait for it
    until its timeout, so it runs in a thread while the watchdog's verdict is awaited."""
    from worker.parallel.state import join_group

    errors: list[BaseException] = []

    def join() -> None:
        try:
            join_group(link.group, store)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=join, name="tp-join", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.1)
        if link.group.failure is not None:
            raise FatalEngineError(f"while starting: {link.group.failure}")
    if errors:
        raise errors[0]


def _spawn_follower(
    config: EngineConfig, rank: int, port: int, ring: str, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    env = dict(env)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable, "-m", "headrace.tp_follower",
        "--rank", str(rank),
        "--store-port", str(port),
        "--ring", ring,
        "--leader-pid", str(os.getpid()),
        "--log-level", logging.getLevelName(logging.getLogger().level),
        "--config-json", msgspec.json.encode(config).decode(),
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env)


def _force_exit(why: str) -> None:
    """The watchdog's last resort in a worker: the engine thread had its chance to fail the
    requests in flight and exit; if it is stuck in a collective, exit from here."""

    def later() -> None:
        time.sleep(FORCED_EXIT_AFTER_S)
        print(f"headrace: {why}; exiting", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=later, name="tp-forced-exit", daemon=True).start()
