"""Launching a step without waiting for it: the model runner's side of async scheduling.

    CPU:   schedule N+1 ─ build ─ launch N+1 ─ wait ids(N) ─ postprocess N ─ schedule N+2 ...
    GPU:   [ step N ...... ][ step N+1 ............... ][ step N+2 ...
    copy:                  [ids(N) -> pinned]            (side stream, after N's sampling)

A row whose token is a placeholder (its request's token from the step still in flight)
takes its id from that step's sampled tensor on the device. A step's sampled ids,
logprobs and prompt logprobs reach pinned host memory by a copy on a side stream, ordered
after the sampling by an event; the engine waits on that event when it postprocesses the
step, never on the compute stream (which by then runs the next step).

Sampling that reads a request's generated tokens (penalties, min_tokens, a grammar's
mask) cannot run before the token in flight is known: such a step queues its forward and
logits at launch and samples once the previous step is applied (`sample`), still while
its forward runs on the GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from worker.device_copy import host_tensor
from worker.input_batch import HostInputs, take_rows
from worker.model_runner import StepResult
from worker.request import Request
from worker.sampler import LogprobsTensors, compute_logprobs
from worker.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from worker.model_runner import ModelRunner


@dataclass
class HostCopy:
    """Device tensors on their way to pinned host memory, off the compute stream."""

    host: list[torch.Tensor]
    done: torch.cuda.Event | None = None

    @classmethod
    def start(cls, tensors: list[torch.Tensor], stream: torch.cuda.Stream | None) -> HostCopy:
        if stream is None or not tensors or not tensors[0].is_cuda:
            return cls(list(tensors))  # on the host already (CPU engine)
        ready = torch.cuda.Event()
        ready.record()  # on the compute stream, after the kernels that wrote `tensors`
        host = []
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            for t in tensors:
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                t.record_stream(stream)  # its memory is not reused before the copy ran
                host.append(h)
            done = torch.cuda.Event()
            done.record(stream)
        return cls(host, done)

    def wait(self) -> list[torch.Tensor]:
        if self.done is not None:
            self.done.synchronize()  # this copy only: the compute stream keeps running
        return self.host


@dataclass
class LaunchedStep:
    """A step queued on the device; its results are read by `read`."""

    sched: SchedulerOutput
    sample_index: list[int]  # the scheduled index of each sampled row, in row order
    row_of: dict[str, int]  # request id -> its sampled row (the next step's id feed)
    logits: torch.Tensor | None = None  # [S, V] while sampling waits (see `sample`)
    token_ids: torch.Tensor | None = None  # [S] int64 once sampled
    logprobs: LogprobsTensors | None = None
    prompt_logprobs: list[tuple[int, int, LogprobsTensors]] = field(default_factory=list)
    copy: HostCopy | None = None
    deferred: bool = False  # sampling waits for the previous step's tokens

    @property
    def requests(self) -> list[Request]:
        return [self.sched.scheduled[i].request for i in self.sample_index]


def needs_known_tokens(req: Request) -> bool:
    """Does sampling `req` now read generated tokens it does not have yet?"""
    if not req.num_placeholders:
        return False
    p = req.params
    return (
        req.grammar is not None
        or p.presence_penalty != 0.0
        or p.frequency_penalty != 0.0
        or p.repetition_penalty != 1.0
        or req.num_output_tokens < p.min_tokens
    )


@torch.inference_mode()
def launch(
    runner: ModelRunner,
    sched: SchedulerOutput,
    prev: LaunchedStep | None,
    stream: torch.cuda.Stream | None,
) -> LaunchedStep:
    """Queue `sched` (no speculative tokens) on the device: forward, logits, prompt
    logprobs, and sampling unless it must wait (then `deferred`). Call before the
    scheduler advances past it; `prev`, the step in flight, must be sampled."""
    host = runner.build_inputs(sched)  # the persistent input batch (or a rebuild)
    ids = fed_input_ids(host, sched, prev, runner.device)
    index = host.sample_sched_index
    reqs = [sched.scheduled[i].request for i in index]
    step = LaunchedStep(sched, index, {r.request_id: j for j, r in enumerate(reqs)})
    if index == list(range(len(sched.scheduled))) and not host.prompt_logprobs:
        # All rows plain greedy decodes: one replay of the graph that ends in the argmax.
        step.token_ids = runner.greedy_step(sched, host, ids)
        if step.token_ids is not None:
            step.copy = HostCopy.start([step.token_ids], stream)
            return step
    hidden = runner.forward(host, ids, scheduled=sched.scheduled)
    if index:
        rows = [r[0] for r in host.sample_rows]
        step.logits = runner.sampled_logits(hidden, rows, reqs)  # [S, V]
    for job in host.prompt_logprobs:
        k = sched.scheduled[job.sched_index].request.params.prompt_logprobs or 0
        logits = runner.model.compute_logits(take_rows(hidden, job.rows))
        targets = _to_device(job.targets, runner.device)
        step.prompt_logprobs.append((job.sched_index, k, compute_logprobs(logits, targets, k)))
    step.deferred = any(needs_known_tokens(r) for r in reqs)
    if not step.deferred:
        # The seeded draw's step counts the token in flight (as a sync engine would).
        sample(runner, step, stream, [r.num_output_tokens + r.num_placeholders for r in reqs])
    return step


@torch.inference_mode()
def sample(
    runner: ModelRunner,
    step: LaunchedStep,
    stream: torch.cuda.Stream | None,
    steps: list[int] | None = None,
) -> None:
    """Draw the step's tokens (its requests' known tokens are all the sampler reads) and
    start their copy to the host."""
    if step.logits is not None:
        reqs = step.requests
        batch = runner.sampling_batch(reqs, steps, runner.masks.bitmask([(r, []) for r in reqs]))
        sampled = runner.sampler(step.logits, batch)
        step.token_ids, step.logprobs, step.logits = sampled.token_ids, sampled.logprobs, None
    tensors = [] if step.token_ids is None else [step.token_ids]
    if step.logprobs is not None:
        tensors += _logprob_tensors(step.logprobs)
    for _, _, lps in step.prompt_logprobs:
        tensors += _logprob_tensors(lps)
    step.copy = HostCopy.start(tensors, stream)
    step.deferred = False


def read(step: LaunchedStep) -> StepResult:
    """The step's results on the host: waits for its copy, not for later steps."""
    assert step.copy is not None, "read() before sample()"
    host = iter(step.copy.wait())
    n = len(step.sched.scheduled)
    new_tokens: list[list[int]] = [[] for _ in range(n)]
    result = StepResult(new_tokens, [[] for _ in range(n)])
    if step.token_ids is not None:
        tokens = next(host).tolist()
        for j, i in enumerate(step.sample_index):
            new_tokens[i] = [int(tokens[j])]
        if step.logprobs is not None:
            params = [r.params for r in step.requests]
            lps = _host_logprobs(host).to_lists([p.logprobs or 0 for p in params])
            for j, i in enumerate(step.sample_index):
                if params[j].logprobs is not None:
                    result.logprobs[i] = [lps[j]]
    for i, k, lp in step.prompt_logprobs:
        result.prompt_logprobs[i] = _host_logprobs(host).to_lists([k] * lp.ranks.shape[0])
    return result


def fed_input_ids(
    host: HostInputs, sched: SchedulerOutput, prev: LaunchedStep | None, device: torch.device
) -> torch.Tensor | None:
    """The step's input ids on the device with each placeholder's row taken from `prev`'s
    sampled ids; None when every id is known on the host."""
    if prev is None or prev.token_ids is None:
        return None
    dst: list[int] = []
    src: list[int] = []
    for i, sr in enumerate(sched.scheduled):
        req = sr.request
        if sr.start >= len(req.all_token_ids):  # its token is prev's, still on the device
            assert sr.num_new_tokens == 1, sr
            dst.append(int(host.query_start_loc[i]))
            src.append(prev.row_of[req.request_id])
    if not dst:
        return None
    n = len(dst)
    if n == host.num_tokens and dst == src == list(range(n)):
        return prev.token_ids[:n]  # the steady state: the same decodes, in the same order
    ids = _to_device(host.input_ids, device)
    ids.index_copy_(0, _to_device(dst, device), prev.token_ids[_to_device(src, device)])
    return ids


def _to_device(values: object, device: torch.device) -> torch.Tensor:
    """Host int64 values on the device, through pinned memory: no wait on the stream."""
    return host_tensor(values, torch.int64, device)


def _logprob_tensors(lp: LogprobsTensors) -> list[torch.Tensor]:
    return [lp.token_ids, lp.logprobs, lp.ranks]


def _host_logprobs(host: Iterator[torch.Tensor]) -> LogprobsTensors:
    return LogprobsTensors(next(host), next(host), next(host))
