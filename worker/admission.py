"""Overload control for one worker, whatever engine it runs and however many gateways feed
it: `--max-num-queued-reqs` / `--max-num-queued-tokens` bound the requests (and their
prompt tokens) that wait for their first token; past them a request is refused at once
with status 429, which the gateway returns with a Retry-After header. With
`--max-queue-wait S`, a request still without its first token after S seconds fails with
a 503 naming the flag instead of waiting on.

Also the worker's drain: once `draining`, every new request is refused with a 503.

Pure Python; the worker's engine thread owns it (no locking).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from ipc.messages import EngineRequest, FinishReason, RequestOutput

OVERLOADED = 429
UNAVAILABLE = 503


@dataclass(frozen=True)
class AdmissionLimits:
    max_num_queued_reqs: int | None = None  # waiting for a first token, at most
    max_num_queued_tokens: int | None = None  # their prompt tokens, at most
    max_queue_wait: float | None = None  # seconds to a first token before failing

    def validate(self) -> None:
        for name in ("max_num_queued_reqs", "max_num_queued_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.max_queue_wait is not None and self.max_queue_wait <= 0:
            raise ValueError(f"--max-queue-wait must be > 0, got {self.max_queue_wait}")


def refusal(request_id: str, message: str, status: int) -> RequestOutput:
    return RequestOutput(
        request_id, finish_reason=FinishReason.ERROR, error=message, error_status=status
    )


class Admission:
    """The queue (admitted, no output yet) with its limits."""

    def __init__(self, limits: AdmissionLimits) -> None:
        limits.validate()
        self.limits = limits
        self.queued: dict[str, tuple[int, float]] = {}  # request id -> (prompt tokens, since)
        self.queued_tokens = 0
        self.draining = False
        self.num_refused = 0  # counter

    def refuse(self, req: EngineRequest) -> RequestOutput | None:
        """A refusal for `req` (and it is not queued), or None: it is queued now."""
        lim = self.limits
        n = len(req.prompt_token_ids)
        why = None
        status = OVERLOADED
        if self.draining:
            why, status = "the worker is shutting down; retry", UNAVAILABLE
        elif lim.max_num_queued_reqs is not None and len(self.queued) >= lim.max_num_queued_reqs:
            why = (
                f"the server is overloaded: {len(self.queued)} requests are queued "
                f"(--max-num-queued-reqs {lim.max_num_queued_reqs}); retry later"
            )
        elif (
            lim.max_num_queued_tokens is not None
            and self.queued
            and self.queued_tokens + n > lim.max_num_queued_tokens
        ):
            why = (
                f"the server is overloaded: {self.queued_tokens} prompt tokens are queued "
                f"(--max-num-queued-tokens {lim.max_num_queued_tokens}); retry later"
            )
        if why is not None:
            self.num_refused += 1
            return refusal(req.request_id, why, status)
        self.queued[req.request_id] = (n, time.monotonic())
        self.queued_tokens += n
        return None

    def started(self, outputs: list[RequestOutput]) -> None:
        """Requests with an output (a token, a finish, an error) are no longer queued."""
        if not self.queued:
            return
        for out in outputs:
            self.forget(out.request_id)

    def forget(self, request_id: str) -> None:
        entry = self.queued.pop(request_id, None)
        if entry is not None:
            self.queued_tokens -= entry[0]

    def expired(self) -> list[RequestOutput]:
        """Errors for the requests queued longer than --max-queue-wait (now forgotten);
        the caller aborts them in the engine."""
        wait = self.limits.max_queue_wait
        if wait is None or not self.queued:
            return []
        now = time.monotonic()
        late = [rid for rid, (_, since) in self.queued.items() if now - since > wait]
        for rid in late:
            self.forget(rid)
        message = f"no first token within {wait} s in the queue (--max-queue-wait); retry later"
        return [refusal(rid, message, UNAVAILABLE) for rid in late]


def add_admission_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--max-num-queued-reqs",
        type=int,
        default=None,
        help="refuse (429) new requests while this many wait for their first token",
    )
    g.add_argument(
        "--max-num-queued-tokens",
        type=int,
        default=None,
        help="refuse (429) new requests while the waiting ones hold this many prompt tokens",
    )
    g.add_argument(
        "--max-queue-wait",
        type=float,
        default=None,
        help="fail (503) a request still without its first token after this many seconds",
    )


def admission_from_args(args: argparse.Namespace) -> AdmissionLimits:
    limits = AdmissionLimits(
        max_num_queued_reqs=args.max_num_queued_reqs,
        max_num_queued_tokens=args.max_num_queued_tokens,
        max_queue_wait=args.max_queue_wait,
    )
    limits.validate()
    return limits


def admission_flags(limits: AdmissionLimits) -> list[str]:
    """The same limits as command-line flags (how `headrace serve` passes them on)."""
    flags = []
    for name in ("max_num_queued_reqs", "max_num_queued_tokens", "max_queue_wait"):
        value = getattr(limits, name)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags
