"""A step timeline: per engine step, host time by phase, GPU busy time and the idle gap.

`StepTimeline(engine)` wraps a few of the engine's bound methods (instance attributes, so
`detach()` restores them and nothing changes for other engines) and records, per call of
`step_with_owners` (`step` in an older engine: this module times an older checkout too):

    host   schedule | inputs (runner.build_inputs) | forward (around the model's forward,
           or the graph runner's input copies and replay) | sample (logits and sampler
           launches) | wait (the rest of reading the tokens: the step's host sync) |
           outputs (postprocess) | other (the rest of the call)
    GPU    two events on torch's stream: `start` before the step's first forward, `end`
           after its last sampler call. busy = end - start; gap = start - previous end
           (0 when the GPU was still busy with the previous step: the host kept ahead)

    GPU  ..[ step N: busy ]......gap......[ step N+1: busy ]..
    host   [sched|inputs|fwd|sample|  wait  |outputs][sched|inputs|fwd|...

"busy" includes time the GPU waited inside the step for the host to launch (between the
start event and the replay): the gap is a lower bound of the GPU's idle time. With async
scheduling a call launches the next step before reading this one: its record's GPU times
are those of the step it launched. On CPU there are no events (GPU fields are None).

Steps are grouped by kind: `decode` (every request computes its one next token, plus
proposals), `prefill` (none does), `mixed`; and by `graph` (a CUDA graph replayed) or `eager`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.scheduler import SchedulerOutput

_UNSET = object()
PHASES = ("schedule", "inputs", "forward", "sample", "wait", "outputs", "other")


class GpuClock(Protocol):
    """Marks on the device's stream and the milliseconds between two of them."""

    def mark(self) -> Any: ...

    def elapsed_ms(self, a: Any, b: Any) -> float: ...


class CudaClock:
    def __init__(self) -> None:
        import torch

        self._torch = torch

    def mark(self) -> Any:
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, a: Any, b: Any) -> float:
        b.synchronize()
        return float(a.elapsed_time(b))


@dataclass
class StepRecord:
    kind: str = ""  # decode / prefill / mixed ("" for a call that scheduled nothing)
    graph: bool = False
    num_reqs: int = 0
    num_tokens: int = 0
    host_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    wall_s: float = 0.0
    start: Any = None  # GPU marks (None on CPU)
    end: Any = None
    busy_ms: float | None = None
    gap_ms: float | None = None


def step_kind(out: SchedulerOutput) -> str:
    """decode: every request computes only its next token (and proposals); prefill: none."""
    decode = [
        sr.num_new_tokens - sr.num_spec_tokens == 1 and sr.start >= sr.request.num_prompt_tokens
        for sr in out.scheduled
    ]
    if all(decode):
        return "decode"
    return "prefill" if not any(decode) else "mixed"


class StepTimeline:
    """Records every engine step between attach() and detach() (see the module docstring)."""

    def __init__(self, engine: Any, clock: GpuClock | None = None) -> None:
        self.engine = engine
        if clock is None and engine.device.type == "cuda":
            clock = CudaClock()
        self.clock = clock
        self.records: list[StepRecord] = []
        self._cur: StepRecord | None = None
        self._patched: list[tuple[Any, str, Any]] = []

    # ---- wrapping ------------------------------------------------------------------------
    def attach(self) -> StepTimeline:
        e, r = self.engine, self.engine.runner
        # Only names older engines have too, where it can (an older checkout's engine can be
        # timed with this module copied in): step, not step_with_owners, if that is missing.
        self._wrap(e, "step_with_owners" if hasattr(e, "step_with_owners") else "step", self._step)
        self._wrap(e, "_postprocess", self._phase("outputs"))
        self._wrap(e.scheduler, "schedule", self._scheduled)
        if hasattr(e.scheduler, "schedule_chained"):
            self._wrap(e.scheduler, "schedule_chained", self._scheduled)
        # The forward's launch: the model eagerly, or a CUDA graph's input copies and replay.
        self._wrap(r.model, "forward", self._forward(graph=False))
        if r.graph_runner is not None:
            self._wrap(r.graph_runner, "run", self._forward(graph=True))
            if hasattr(r.graph_runner, "run_greedy"):  # the graph ends in the argmax: the
                # step's GPU work is all queued when it returns (its token read is `other`)
                self._wrap(r.graph_runner, "run_greedy", self._greedy)
        self._wrap(r.model, "compute_logits", self._phase("sample"))
        if hasattr(r.model, "greedy_logits"):  # all-greedy eager steps: the 16-bit logits
            self._wrap(r.model, "greedy_logits", self._phase("sample"))
        self._wrap(r, "sampler", lambda real: _TimedSampler(real, self._sampler(real)))
        for name in ("sample", "finish"):  # what remains of them is the wait for the tokens
            if hasattr(r, name):
                self._wrap(r, name, self._read_tokens)
        if hasattr(r, "build_inputs"):
            self._wrap(r, "build_inputs", self._phase("inputs"))
        else:  # an older runner: the module function it calls
            import worker.model_runner as mr

            self._wrap(mr, "build_host_inputs", self._phase("inputs"))
        return self

    def detach(self) -> None:
        """Put every wrapped attribute back as it was."""
        for obj, name, old in reversed(self._patched):
            if old is _UNSET:
                delattr(obj, name)  # a bound method: the class's is found again
            else:
                setattr(obj, name, old)
        self._patched = []

    def _wrap(
        self, obj: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
    ) -> None:
        old = vars(obj).get(name, _UNSET)
        setattr(obj, name, make(getattr(obj, name)))
        self._patched.append((obj, name, old))

    def _phase(
        self, phase: str, exclusive: bool = False
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Time calls of `real` into `phase`; `exclusive`: minus the phases timed inside it."""

        def make(real: Callable[..., Any]) -> Callable[..., Any]:
            def timed(*args: Any, **kwargs: Any) -> Any:
                rec = self._cur
                if rec is None:
                    return real(*args, **kwargs)
                inner0 = sum(rec.host_s.values())
                t0 = time.perf_counter()
                try:
                    return real(*args, **kwargs)
                finally:
                    dt = time.perf_counter() - t0
                    if exclusive:
                        dt -= sum(rec.host_s.values()) - inner0
                    rec.host_s[phase] += dt

            return timed

        return make

    # ---- the hooks -----------------------------------------------------------------------
    def _step(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            rec = self._cur = StepRecord()
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                rec.wall_s = time.perf_counter() - t0
                rec.host_s["other"] = max(0.0, rec.wall_s - sum(rec.host_s.values()))
                self._cur = None
                if rec.kind:
                    self.records.append(rec)

        return step

    def _scheduled(self, real: Callable[..., Any]) -> Callable[..., Any]:
        timed = self._phase("schedule")(real)

        def schedule(*args: Any, **kwargs: Any) -> Any:
            out = timed(*args, **kwargs)
            rec = self._cur
            if rec is not None and out is not None and not out.empty:
                rec.kind, rec.num_reqs = step_kind(out), len(out.scheduled)
                rec.num_tokens = sum(sr.num_new_tokens for sr in out.scheduled)
            return out

        return schedule

    def _forward(self, graph: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(real: Callable[..., Any]) -> Callable[..., Any]:
            timed = self._phase("forward")(real)

            def forward(*args: Any, **kwargs: Any) -> Any:
                rec = self._cur
                if rec is not None:
                    rec.graph = rec.graph or graph
                    if self.clock is not None and rec.start is None:
                        rec.start = self.clock.mark()
                return timed(*args, **kwargs)

            return forward

        return make

    def _greedy(self, real: Callable[..., Any]) -> Callable[..., Any]:
        forward = self._forward(graph=True)(real)

        def greedy(*args: Any, **kwargs: Any) -> Any:
            out = forward(*args, **kwargs)
            rec = self._cur
            if rec is not None and self.clock is not None:
                rec.end = self.clock.mark()
            return out

        return greedy

    def _sampler(self, real: Callable[..., Any]) -> Callable[..., Any]:
        timed = self._phase("sample")(real)

        def sampler(*args: Any, **kwargs: Any) -> Any:
            out = timed(*args, **kwargs)
            rec = self._cur
            if rec is not None and self.clock is not None:
                rec.end = self.clock.mark()
            return out

        return sampler

    def _read_tokens(self, real: Callable[..., Any]) -> Callable[..., Any]:
        timed = self._phase("wait", exclusive=True)(real)

        def read(*args: Any, **kwargs: Any) -> Any:
            out = timed(*args, **kwargs)
            rec = self._cur
            if rec is not None and self.clock is not None and rec.end is None:
                rec.end = self.clock.mark()  # no sampler call (speculative rows only)
            return out

        return read

    # ---- the report ----------------------------------------------------------------------
    def resolve(self) -> None:
        """Turn the GPU marks into busy and gap milliseconds (waits for the device)."""
        if self.clock is None:
            return
        prev_end = None
        for rec in self.records:
            if rec.start is not None and rec.end is not None:
                rec.busy_ms = self.clock.elapsed_ms(rec.start, rec.end)
            if rec.start is not None and prev_end is not None:
                rec.gap_ms = max(0.0, self.clock.elapsed_ms(prev_end, rec.start))
            prev_end = rec.end if rec.end is not None else prev_end

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """Per 'kind/graph|eager': steps, mean requests and tokens, mean ms per phase, wall,
        GPU busy and gap (None without a GPU)."""
        self.resolve()
        groups: dict[str, list[StepRecord]] = {}
        for rec in self.records:
            groups.setdefault(f"{rec.kind}/{'graph' if rec.graph else 'eager'}", []).append(rec)
        out: dict[str, dict[str, float | int | None]] = {}
        for key, recs in sorted(groups.items()):
            n = len(recs)
            row: dict[str, float | int | None] = {
                "steps": n,
                "reqs": sum(r.num_reqs for r in recs) / n,
                "tokens": sum(r.num_tokens for r in recs) / n,
                "wall_ms": 1000 * sum(r.wall_s for r in recs) / n,
            }
            for p in PHASES:
                row[f"{p}_ms"] = 1000 * sum(r.host_s[p] for r in recs) / n
            row["host_ms"] = sum(float(row[f"{p}_ms"] or 0) for p in PHASES if p != "wait")
            row["gpu_busy_ms"] = _mean([r.busy_ms for r in recs])
            row["gap_ms"] = _mean([r.gap_ms for r in recs])
            # A mean gap can be many small ones or a few stalls: the spread says which.
            gaps = sorted(r.gap_ms for r in recs if r.gap_ms is not None)
            row["gap_p50_ms"] = _quantile(gaps, 0.5)
            row["gap_p90_ms"] = _quantile(gaps, 0.9)
            row["gap_max_ms"] = gaps[-1] if gaps else None
            row["gap_total_ms"] = sum(gaps) if gaps else None
            out[key] = row
        return out

    def worst_gaps(self, n: int = 10) -> list[dict[str, Any]]:
        """The n steps with the longest idle gap before them, with the step before each
        (what the GPU had just finished when the host fell behind)."""
        self.resolve()
        rows: list[tuple[float, dict[str, Any]]] = []
        for i, rec in enumerate(self.records):
            if rec.gap_ms is None:
                continue
            prev = self.records[i - 1] if i > 0 else None
            rows.append(
                (
                    rec.gap_ms,
                    {
                        "step": i,
                        "kind": f"{rec.kind}/{'graph' if rec.graph else 'eager'}",
                        "reqs": rec.num_reqs,
                        "tokens": rec.num_tokens,
                        "gap_ms": rec.gap_ms,
                        "busy_ms": rec.busy_ms,
                        "prev_kind": None if prev is None else prev.kind,
                        "prev_reqs": None if prev is None else prev.num_reqs,
                    },
                )
            )
        return [row for _, row in sorted(rows, key=lambda r: -r[0])[:n]]


class _TimedSampler:
    """The runner's Sampler with its calls timed; everything else goes to the sampler."""

    def __init__(self, sampler: Any, timed_call: Callable[..., Any]) -> None:
        self._sampler = sampler
        self._call = timed_call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _quantile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def format_summary(summary: dict[str, dict[str, float | int | None]]) -> str:
    """A table, one row per step kind: host phases, GPU busy, idle gap (ms per step)."""
    cols = ["steps", "reqs", "tokens", "wall_ms", *[f"{p}_ms" for p in PHASES]]
    cols += ["host_ms", "gpu_busy_ms", "gap_ms", "gap_p90_ms", "gap_max_ms"]
    head = f"{'step kind':16s}" + "".join(f"{c.removesuffix('_ms'):>9s}" for c in cols)
    lines = [head + "   (ms per step; host = all phases but wait)"]
    for key, row in summary.items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{'-':>9s}" if v is None else f"{v:9d}" if c == "steps" else f"{v:9.3f}")
        lines.append(f"{key:16s}" + "".join(cells))
    return "\n".join(lines)
