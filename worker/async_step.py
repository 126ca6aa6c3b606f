"""Async scheduling (the default): step N+1 is scheduled and launched while step N runs.

One call of `AsyncStepper.step`, with step N in flight:

    1. schedule N+1: each request of N that samples holds a placeholder for its token, so
       the scheduler plans as if N had produced one token per row (admissions, chunked
       prefill, preemptions and finishes by length included: vLLM v1's async scheduler)
    2. launch N+1 (worker/step_launch.py): placeholder rows take N's sampled ids on the
       device; then the scheduler advances past N+1
    3. read N's ids (their copy to the host ran on a side stream) and apply them: a
       request that N finishes (EOS, stop id) is retired, and N+1's token for it is
       dropped when N+1 is applied; a request preempted by N+1's schedule keeps its token
    4. sample N+1 now if its sampling had to wait for N's tokens (penalties, min_tokens,
       a grammar's mask), still while N+1's forward runs
    5. return N's outputs

Outputs therefore come one step later than they are computed, and requests that finish
at N cost one wasted row in N+1, as in vLLM. Steps stay synchronous (step N applied
before N+1 is scheduled) where the next schedule depends on N's results beyond its
sampled tokens: with speculative decoding (the proposals come from N's tokens; the
engine then runs every step synchronously) and after a prefill that ends in KV cache
compression (the compaction changes the request's block table).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from worker.request import OwnedOutput
from worker.step_launch import LaunchedStep, launch, read, sample

if TYPE_CHECKING:
    from worker.engine import EngineCore


class AsyncStepper:
    """The engine's step with one step in flight (see the module docstring)."""

    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self.inflight: LaunchedStep | None = None
        cuda = engine.device.type == "cuda"
        # The device-to-host copies of sampled ids: off the compute stream, so waiting
        # for step N's ids does not wait for step N+1.
        self.stream = torch.cuda.Stream(engine.device) if cuda else None
        self.num_steps = 0  # steps launched
        self.num_overlapped = 0  # of them, launched while the previous step ran
        self.num_deferred = 0  # of them, sampled only once the previous step was applied

    def step(self) -> list[OwnedOutput]:
        prev, self.inflight = self.inflight, None
        outputs: list[OwnedOutput] = []
        if prev is not None and not self._can_overlap(prev):
            outputs, prev = self._apply(prev), None
        e = self.engine
        sched = e.scheduler.schedule()
        if sched.empty:
            return outputs + (self._apply(prev) if prev is not None else [])
        step = launch(e.runner, sched, prev, self.stream)
        e.scheduler.advance(sched)
        self.num_steps += 1
        self.num_overlapped += prev is not None
        if prev is not None:
            outputs += self._apply(prev)
        if step.deferred:
            self.num_deferred += 1
            sample(e.runner, step, self.stream)  # its requests' tokens are all known now
        if any(not sr.request.is_finished for sr in sched.scheduled):
            self.inflight = step
        # else: every request of it has finished (or was aborted): nothing to read
        return outputs

    def drop(self) -> None:
        """Forget the step in flight (shutdown): its results are never read."""
        self.inflight = None

    def _apply(self, step: LaunchedStep) -> list[OwnedOutput]:
        return self.engine._postprocess(step.sched, read(step), placeholders=True)

    @staticmethod
    def _can_overlap(prev: LaunchedStep) -> bool:
        """May the next step be scheduled before `prev`'s results are applied?"""
        # KV compression compacts a request's cache after its prefill's step: its next
        # step's block table and cache offset come from that.
        return not any(sr.request.kv_compression_pending for sr in prev.sched.scheduled)
