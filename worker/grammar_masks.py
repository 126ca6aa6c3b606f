"""Each step's grammar bitmask, prepared on a worker thread while the GPU runs the forward.

The mask for step N depends only on the tokens up to step N-1. So as soon as step N-1's
tokens are applied (the engine's postprocess calls `prefetch`), one job on the mask thread
advances every constrained request's matcher over its new tokens and fills its next mask,
while the main thread builds and launches step N. The sampler's `bitmask` waits for that
job only when it needs the mask, after the forward is queued:

    main:   tokens(N-1) ─ prefetch ─ outputs ─ schedule N ─ launch N ─ bitmask ─ sample N
    thread:                 └─ accept tokens(N-1) ─ fill masks(N) ──────┘ (waited here)
    GPU:                                              [ forward N ..........][mask][sample]

Both xgrammar calls the job makes (batch accept, batch fill) run without the GIL, the fill
on xgrammar's own threads; around them the job needs the GIL for a little Python (and no
per-request xgrammar calls: each gives the GIL up and must win it back). Under the
interpreter's 5 ms switch interval it gets it once the main thread blocks: in a synchronous
engine that is at sampling time, with the forward queued, which hides the job behind it.
With async scheduling the main thread runs Python until it samples (there is no forward to
wait on in between), so there `eager` lowers the switch interval to SWITCH_INTERVAL_S while
a job is in flight, and the job runs beside that Python. The job writes into one preallocated host buffer (pinned on a
GPU), laid out in the order of the requests that gained tokens:

    host[0 .. n)  one row per request of `prefetch`: its mask, or all ones (-1) when it is
                  free, finished or its grammar is done
    host[cap]     all ones: the row gathered for rows the step does not constrain

When the step samples exactly those requests in that order (the steady state), `host`
itself goes to the device (one non-blocking copy); otherwise its rows are gathered into a
second buffer, and rows the job did not fill (a request's first token, speculative rows
after each proposal) are filled then. Only the mask thread and, after waiting for it, the
main thread touch matchers: `wait` runs before any other use, so aborts and preemption
(which only drop requests) never race a fill.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sys
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import xgrammar as xgr

    from worker.request import Request
    from worker.structured import RequestGrammar

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0002  # the interpreter's GIL switch interval while a job is in flight


@dataclass
class MaskStats:
    """Where the mask work went (seconds, summed over steps); `headrace bench structured`."""

    steps: int = 0  # bitmasks handed to the sampler
    job_s: float = 0.0  # on the mask thread: accepting tokens and filling rows
    wait_s: float = 0.0  # the main thread blocked on a job: the cost the overlap failed to hide
    assemble_s: float = 0.0  # main thread: gather, rows filled now, the copy to the device
    rows_prefetched: int = 0  # rows the job had ready
    rows_filled_now: int = 0  # rows filled at sampling time
    gathers: int = 0  # steps whose rows were not the job's layout

    def per_step(self) -> dict[str, float]:
        n = max(self.steps, 1)
        out = {f.name: float(getattr(self, f.name)) for f in fields(self)}
        for k in ("job_s", "wait_s", "assemble_s"):
            out[k.replace("_s", "_ms_per_step")] = 1000 * out.pop(k) / n
        return out


class _Staging:
    """A host buffer of mask rows (pinned for a GPU) and the device copy that last read it."""

    def __init__(self, words: int, device: torch.device) -> None:
        self.words = words
        self.device = device
        self.tensor = torch.empty((0, words), dtype=torch.int32)
        self.copied: torch.cuda.Event | None = None

    def writable(self, num_rows: int) -> torch.Tensor:
        """The buffer, with at least num_rows rows, once no copy still reads it (normally
        long done: the step that read it has returned its tokens)."""
        if self.copied is not None:
            self.copied.synchronize()
        if self.tensor.shape[0] < num_rows:
            pin = self.device.type == "cuda"
            # A normal tensor even under the runner's inference mode: the mask thread
            # (outside it) writes these buffers, which an inference tensor would refuse.
            with torch.inference_mode(False):
                self.tensor = torch.empty(
                    (max(64, 1 << (num_rows - 1).bit_length()), self.words),
                    dtype=torch.int32,
                    pin_memory=pin,
                )
        return self.tensor

    def to_device(self, num_rows: int) -> torch.Tensor:
        """Rows [0, num_rows) as the step's mask on the device."""
        host = self.tensor[:num_rows]
        if self.device.type != "cuda":
            return host.clone()  # the buffer is refilled next step; the caller keeps this
        mask = torch.empty(host.shape, dtype=torch.int32, device=self.device)
        mask.copy_(host, non_blocking=True)
        if self.copied is None:
            self.copied = torch.cuda.Event()
        self.copied.record()
        return mask


@dataclass
class _Prefetched:
    order: list[RequestGrammar | None]  # row i of the host buffer: whose mask (None: all ones)
    row: dict[int, int]  # id(grammar) -> its row


class StepMasks:
    """The grammar bitmask of each step for one model runner (see the module docstring)."""

    def __init__(self, vocab_size: int, device: torch.device, eager: bool = False) -> None:
        self.vocab_size = vocab_size
        self.eager = eager  # run jobs beside the main thread's Python (async scheduling)
        self.words = (vocab_size + 31) // 32
        self.device = device
        self.stats = MaskStats()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._job: concurrent.futures.Future[_Prefetched] | None = None
        self._ready: _Prefetched | None = None
        # The job's rows (its last row all ones), and two buffers for gathered rows, used in
        # turn: a speculative step's two masks never wait for each other's copy.
        self._host = _Staging(self.words, device)
        self._gathered = [_Staging(self.words, device) for _ in range(2)]
        self._turn = 0
        self._filler: xgr.BatchGrammarMatcher | None = None
        self._switch_interval = sys.getswitchinterval()

    # ---- after a step: start the next step's masks --------------------------------------
    def prefetch(self, updates: list[tuple[Request, list[int]]]) -> None:
        """Advance matchers over the tokens each request gained and fill their next masks,
        on the mask thread. Costs nothing when no request is constrained."""
        if self._job is None and self._ready is None and _unconstrained(updates):
            return  # the common step: nothing to join, nothing prefetched, nothing to start
        self.wait()
        self._ready = None
        if _unconstrained(updates):
            return
        accepts = [
            (req.request_id, req.grammar, tokens)
            for req, tokens in updates
            if req.grammar is not None and tokens and req.grammar.active
        ]
        # Rows for each request that will sample next; a finished one's row stays all ones.
        targets = [None if req.is_finished else req.grammar for req, tokens in updates if tokens]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mask")
        self._switch_interval = sys.getswitchinterval()
        if self.eager:  # see the module docstring
            sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
        self._job = self._pool.submit(self._run_job, accepts, targets)

    def _run_job(
        self,
        accepts: list[tuple[str, RequestGrammar, list[int]]],
        targets: list[RequestGrammar | None],
    ) -> _Prefetched:
        t0 = time.perf_counter()
        self._accept(accepts)
        host = self._host_rows(len(targets))
        order = [g if g is not None and g.active else None for g in targets]
        fill = [i for i, g in enumerate(order) if g is not None]
        free = [i for i, g in enumerate(order) if g is None]
        if free:
            host[free] = -1
        if fill:
            matchers = [order[i].matcher for i in fill]  # type: ignore[union-attr]
            self._batch_filler().batch_fill_next_token_bitmask(matchers, host, fill)
        row = {id(g): i for i, g in enumerate(order) if g is not None}
        self.stats.job_s += time.perf_counter() - t0
        return _Prefetched(order, row)

    def _accept(self, accepts: list[tuple[str, RequestGrammar, list[int]]]) -> None:
        """Every request's tokens, one batched call per position (GIL released); a request
        stops at its grammar's stop token, or at a token its grammar refuses (logged)."""
        import xgrammar as xgr

        live = accepts
        j = 0
        while live:
            ok = xgr.BatchGrammarMatcher.batch_accept_token(
                [g.matcher for _, g, _ in live], [tokens[j] for _, _, tokens in live]
            )
            for (rid, g, tokens), accepted in zip(live, ok, strict=True):
                g.accepted(tokens[j], accepted)
                if not accepted:
                    log.error(
                        "request %s: its grammar rejected an emitted token; no longer constrained",
                        rid,
                    )
            j += 1
            live = [e for e in live if len(e[2]) > j and e[1].active]

    def wait(self) -> None:
        """Join the job in flight, if any: after this, the calling thread owns the matchers."""
        if self._job is None:
            return
        t0 = time.perf_counter()
        job, self._job = self._job, None
        try:
            self._ready = job.result()  # re-raises the job's error here, on the engine thread
        finally:
            sys.setswitchinterval(self._switch_interval)
            self.stats.wait_s += time.perf_counter() - t0

    # ---- at sampling time -------------------------------------------------------------------
    def bitmask(self, rows: list[tuple[Request, list[int]]]) -> torch.Tensor | None:
        """The step's mask [R, ceil(V / 32)] int32 on the device, 1 + len(proposals) rows per
        entry; None when no row is constrained (nothing to apply)."""
        if _unconstrained(rows):
            # No matcher is read: the job in flight (if any) is joined by whoever needs it.
            return None
        self.wait()
        t0 = time.perf_counter()
        pre = self._ready
        live = [
            (None if r.is_finished or r.grammar is None or not r.grammar.active else r.grammar, p)
            for r, p in rows
        ]
        if all(g is None for g, _ in live):
            return None
        self.stats.steps += 1
        if pre is not None and self._is_layout(live, pre):
            self.stats.rows_prefetched += sum(g is not None for g, _ in live)
            mask = self._host.to_device(len(live))
        else:
            mask = self._assemble(live, pre)
        self.stats.assemble_s += time.perf_counter() - t0
        return mask

    @staticmethod
    def _is_layout(live: list[tuple[RequestGrammar | None, list[int]]], pre: _Prefetched) -> bool:
        """Are these rows exactly the job's first rows (no proposals, same order)?"""
        if len(live) > len(pre.order):
            return False
        return all(not p and g is pre.order[i] for i, (g, p) in enumerate(live))

    def _assemble(
        self, live: list[tuple[RequestGrammar | None, list[int]]], pre: _Prefetched | None
    ) -> torch.Tensor:
        """Gather the job's rows into the step's order, fill the rows it lacks, send."""
        from worker.structured import fill_rows

        num_rows = sum(1 + len(p) for _, p in live)
        if self._host.tensor.shape[0] == 0:
            self._host_rows(0)  # no job yet: only the all-ones row is read
        host = self._host.tensor
        ones = host.shape[0] - 1
        index: list[int] = []
        now: list[tuple[RequestGrammar, list[int], int]] = []  # filled here: grammar, props, row
        for g, p in live:
            done = pre.row.get(id(g)) if pre is not None and g is not None and not p else None
            if done is not None:
                index.append(done)
            else:
                if g is not None:
                    now.append((g, p, len(index)))
                index.extend([ones] * (1 + len(p)))
        staging = self._gathered[self._turn]
        self._turn ^= 1
        out = staging.writable(num_rows)[:num_rows]
        torch.index_select(host, 0, torch.tensor(index), out=out)
        fill_rows(out, [(row, g, p) for g, p, row in now], self._batch_filler())
        self.stats.gathers += 1
        self.stats.rows_prefetched += len(live) - sum(1 for g, _ in live if g is None) - len(now)
        self.stats.rows_filled_now += sum(1 + len(p) for _, p, _ in now)
        return staging.to_device(num_rows)

    def _host_rows(self, num_rows: int) -> torch.Tensor:
        """The job's buffer: num_rows rows, then the all-ones row at its end."""
        old = self._host.tensor.shape[0]
        host = self._host.writable(num_rows + 1)
        if host.shape[0] != old:
            host[-1] = -1
        return host

    def _batch_filler(self) -> xgr.BatchGrammarMatcher:
        if self._filler is None:
            import xgrammar as xgr

            self._filler = xgr.BatchGrammarMatcher("auto")
        return self._filler

    def close(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self._job = None
            sys.setswitchinterval(self._switch_interval)
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _unconstrained(rows: list[tuple[Request, list[int]]]) -> bool:
    """No row's request has a grammar (the usual step)."""
    return all(req.grammar is None for req, _ in rows)
