"""The leader's side of a tensor-parallel group: publish every forward, watch the followers.

Rank 0 runs the whole engine (scheduler, KV cache manager, sampler). Before each forward
it publishes the step's flat batch (msgspec TpStep) into the shared-memory ring that the
followers read (ipc/shm_ring.py), then runs the forward itself; before each logits call it
publishes TpLogits. A message larger than a ring slot goes through the ring's overflow
segment. Followers run exactly what is published, in order, so every rank meets the others
in the same collectives.

A follower that exits is seen by the watchdog thread (its process sentinel, polled) or by
the ring (a dead reader holds the writer back): the group is marked failed, collectives
stuck on it are aborted, and the engine's next step raises FatalEngineError.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec
import torch

from ipc.messages import TpLogits, TpMessage, TpStep
from ipc.shm_ring import PeerDied, ShmRingWriter
from worker.input_batch import HostInputs
from worker.model_runner import ModelRunner
from worker.parallel.state import TpGroup

log = logging.getLogger(__name__)
WATCH_EVERY_S = 0.1


class FollowerProcess(Protocol):
    """What the watchdog needs of a follower process (subprocess.Popen has it)."""

    pid: int

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def kill(self) -> None: ...


def step_message(host: HostInputs, use_graph: bool, ids_from_leader: bool) -> TpStep:
    return TpStep(
        input_ids=host.input_ids.tobytes(),
        positions=host.positions.tobytes(),
        slot_mapping=host.slot_mapping.tobytes(),
        query_start_loc=host.query_start_loc.tobytes(),
        seq_lens=host.seq_lens.tobytes(),
        block_tables=host.block_tables.tobytes(),
        block_table_width=int(host.block_tables.shape[1]),
        max_query_len=host.max_query_len,
        max_seq_len=host.max_seq_len,
        use_graph=use_graph,
        ids_from_leader=ids_from_leader,
    )


class LeaderLink:
    """Rank 0's ring writer and follower watchdog (followers are ranks 1, 2, ...)."""

    def __init__(
        self,
        group: TpGroup,
        ring: ShmRingWriter,
        followers: Sequence[FollowerProcess],
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.group = group
        self.ring = ring
        self.followers = list(followers)
        self.on_failure = on_failure  # called once, from the watchdog thread
        self._enc = msgspec.msgpack.Encoder()
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="tp-watchdog", daemon=True)
        self._watchdog.start()

    def attach(self, runner: ModelRunner) -> None:
        """From now on every forward and logits call is published first."""
        runner.step_hook = self.on_step
        self.group.on_logits = self.on_logits

    # ---- publishing (engine thread) -----------------------------------------------------
    def on_step(
        self, host: HostInputs, use_graph: bool, input_ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        self._publish(step_message(host, use_graph, input_ids is not None))
        if input_ids is not None:  # sampled on the leader, still on its device
            input_ids = self.group.broadcast(input_ids.contiguous())
        return input_ids

    def on_logits(self, num_rows: int) -> None:
        self._publish(TpLogits(num_rows))

    def _publish(self, msg: TpMessage) -> None:
        self.group.check()
        try:
            self.ring.publish(self._enc.encode(msg))
        except PeerDied as e:
            self._fail(f"tensor-parallel follower died: {e}")
            self.group.check()

    # ---- the watchdog (its own thread) ----------------------------------------------------
    def _watch(self) -> None:
        while not self._closed.wait(WATCH_EVERY_S):
            for rank, proc in enumerate(self.followers, start=1):
                code = proc.poll()
                if code is not None and not self._closed.is_set():
                    self._fail(
                        f"tensor-parallel follower rank {rank} (pid {proc.pid}) exited "
                        f"with status {code}"
                    )
                    return

    def _fail(self, why: str) -> None:
        if self.group.failure is not None:
            return
        log.error("%s; the group stops", why)
        self.group.failure = why
        self.group.abort()
        if self.on_failure is not None:
            self.on_failure(why)

    # ---- shutdown -----------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Close the ring (followers read what is left, then exit) and reap them."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.ring.close(drain_timeout=1.0)
        for proc in self.followers:
            try:
                proc.wait(timeout)
            except Exception:  # still stuck (a collective that will never complete)
                proc.kill()
                proc.wait()
