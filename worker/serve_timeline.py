"""The serving worker's step timeline, per busy period (HEADRACE_STEP_TIMELINE=PATH).

Offline, `headrace bench throughput --profile` times every step (worker/step_timeline.py).
Over HTTP the same engine runs inside worker/server.py's loop, between the inbox (requests
decoded by the socket thread) and the outbox; the serving gap (offline vs `bench serve` at
infinite rate, issue 12) is either in that loop (slower steps, admissions spread over time)
or outside the worker (gateway, client). This module answers which: with the variable set,
the worker attaches a StepTimeline when a request arrives at an idle engine and, when the
engine is idle again, writes one JSON report to PATH (a later busy period overwrites it):

    requests          taken from the inbox in the period
    span_s            first request taken -> last output put in the outbox
    arrivals_s        first -> last request taken (how spread the admissions were)
    output_tokens     new tokens in the outputs
    loop_s            the loop's time by part: handle (add_request / abort of what the inbox
                      held), step (engine.step_with_owners and the queue's deadlines),
                      outbox (handing outputs to zmq-out), other (the rest: stats, inbox reads)
    timeline          StepTimeline.summary(): per step kind, host phases, GPU busy and gap

and one line on the log. Nothing is recorded without the variable. It is for benchmark runs:
a period's step records (two CUDA events each) stay in memory until the engine is idle.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from worker.step_timeline import StepTimeline, format_summary

ENV = "HEADRACE_STEP_TIMELINE"
PARTS = ("handle", "step", "outbox", "other")
logger = logging.getLogger("headrace.worker")


def from_env(engine: Any) -> ServeTimeline | None:
    path = os.environ.get(ENV, "")
    return ServeTimeline(engine, Path(path)) if path else None


class ServeTimeline:
    """Busy-period reports of one engine (the module docstring); the engine thread calls
    `arrived` and `passed` in every pass of its loop."""

    def __init__(self, engine: Any, path: Path) -> None:
        self.engine = engine
        self.path = path
        self._timeline: StepTimeline | None = None
        self._reset()

    def _reset(self) -> None:
        self.requests = 0
        self.output_tokens = 0
        self.first_taken: float | None = None
        self.last_taken: float | None = None
        self.last_output: float | None = None
        self.loop_s = dict.fromkeys(PARTS, 0.0)

    def arrived(self, taken: int, now: float) -> None:
        """`taken` requests came from the inbox at `now`, before this pass's step: the
        first of a period attaches the step timeline, so that step is in it."""
        if not taken:
            return
        if self.first_taken is None:
            self.first_taken = now
            try:
                self._timeline = StepTimeline(self.engine).attach()
            except AttributeError as e:  # an engine without a runner (tests' fake engine):
                logger.warning("%s: no step timeline for this engine (%s)", ENV, e)
        self.requests += taken
        self.last_taken = now

    def passed(
        self, outputs: list[Any], times: tuple[float, float, float, float, float], busy: bool
    ) -> None:
        """One pass of the loop: its start, inbox handled, step done, stats done, outbox
        put (perf_counter seconds) and `outputs` (OwnedOutput pairs); `busy`: requests
        remain. The first pass with nothing left ends the period and writes the report."""
        if self.first_taken is None:
            return
        t_start, t_handled, t_stepped, t_end, t_sent = times
        for _, out in outputs:
            self.output_tokens += len(out.new_token_ids)
        if outputs:
            self.last_output = t_sent
        s = self.loop_s
        s["handle"] += t_handled - t_start
        s["step"] += t_stepped - t_handled
        s["other"] += t_end - t_stepped
        s["outbox"] += t_sent - t_end
        if not busy:
            self._write()

    def report(self) -> dict[str, Any]:
        first, last = self.first_taken or 0.0, self.last_output or self.first_taken or 0.0
        out: dict[str, Any] = {
            "requests": self.requests,
            "span_s": last - first,
            "arrivals_s": (self.last_taken or first) - first,
            "output_tokens": self.output_tokens,
            "output_tok_s": self.output_tokens / (last - first) if last > first else None,
            "loop_s": dict(self.loop_s),
        }
        if self._timeline is not None:
            out["timeline"] = self._timeline.summary()
        return out

    def _write(self) -> None:
        if self._timeline is not None:
            self._timeline.detach()
        rep = self.report()
        try:
            self.path.write_text(json.dumps(rep, indent=1))
        except OSError as e:
            logger.warning("%s=%s: cannot write the timeline: %s", ENV, self.path, e)
        logger.info(
            "busy period: %d requests, %d output tokens in %.2f s (%s tok/s), arrivals over "
            "%.2f s; loop %s\n%s",
            rep["requests"],
            rep["output_tokens"],
            rep["span_s"],
            f"{rep['output_tok_s']:.1f}" if rep["output_tok_s"] else "-",
            rep["arrivals_s"],
            ", ".join(f"{k} {v:.2f} s" for k, v in rep["loop_s"].items()),
            format_summary(rep["timeline"]) if "timeline" in rep else "",
        )
        self._timeline = None
        self._reset()
