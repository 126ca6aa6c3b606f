"""The scheduler: which requests compute how many tokens this step. Pure Python, no torch.

One token budget per step (`max_num_batched_tokens`). Running requests go first, in
arrival order, each asking for the tokens it has not computed yet (1 for a decode, the
rest of its prompt for a prefill, capped by the budget: chunked prefill). Then waiting
requests are admitted first come, first served while budget, `max_num_seqs` and KV blocks
allow. When a running request cannot get a block, the newest running request is preempted:
its blocks are freed and it goes back to the front of the queue to be recomputed later.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field

from ipc.messages import FinishReason
from worker.config import SchedulerConfig
from worker.kv_cache import Block, KVCacheManager
from worker.kv_reserve import final_blocks, outstanding_growth, reserve_enabled
from worker.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, including speculative ones
    start: int  # num_computed_tokens when scheduled: the position of the first new token
    num_spec_tokens: int = 0  # of num_new_tokens, how many are unverified proposals
    block_table: Sequence[int] = ()  # the request's KV block ids, set once the step is planned
    kv_offset: int = 0  # position - cache index (> 0 once the KV cache is compressed)
    layer_shift: Sequence[int] | None = None  # PyramidKV: per-layer extra index shift
    # Does this step reach the end of the request's tokens (so it samples)? Fixed when
    # scheduled: async scheduling adds a placeholder token right after the launch.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.end >= self.request.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[str] = field(default_factory=list)
    block_size: int = 0  # tokens per KV block, to turn positions into slots

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        config.validate()
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.reserve = reserve_enabled()  # HEADRACE_ADMISSION=reserve (worker/kv_reserve.py)

    # ---- request lifecycle -------------------------------------------------------------------
    def check_new_id(self, request_id: str, also_taken: Container[str] = ()) -> None:
        """ValueError if `request_id` is in use here (or in `also_taken`, requests held
        elsewhere before they join, such as those waiting for a grammar)."""
        if request_id in self.requests or request_id in also_taken:
            raise ValueError(f"request id {request_id!r} is already in use")

    def add_request(self, request: Request) -> None:
        self.check_new_id(request.request_id)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Finish these requests now; unknown or finished ids are ignored."""
        aborted = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.finish_reason = FinishReason.ABORT
            self._finish(req)
            aborted.append(req)
        return aborted

    def finish(self, request: Request) -> None:
        """Retire a running request whose finish_reason has been set."""
        self.running.remove(request)
        self._finish(request)

    def _finish(self, request: Request) -> None:
        request.status = RequestStatus.FINISHED
        self.kv.free(request.request_id)
        del self.requests[request.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        lookahead = self.config.num_lookahead_tokens

        # 1. Running requests, oldest first; preempt from the newest end when out of blocks.
        i = 0
        num_done = 0  # async scheduling: requests the step in flight finishes for sure
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_placeholders and self._finishes_in_flight(req):
                num_done += 1  # a sync schedule would not see it: it takes no slot
                i += 1
                continue
            num_spec = len(req.spec_token_ids)
            num_new = min(req.num_tokens + num_spec - req.num_computed_tokens, budget)
            num_spec = max(0, min(num_spec, req.num_computed_tokens + num_new - req.num_tokens))
            if num_new <= 0:  # nothing to compute (cannot happen for a live request)
                i += 1
                continue
            scheduled = True
            while not self.kv.allocate_slots(
                req,
                num_new,
                num_lookahead_tokens=lookahead,
                num_tokens_to_cache=req.num_computed_tokens + num_new - num_spec,
            ):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    scheduled = False
                    break
            if not scheduled:
                break
            out.scheduled.append(ScheduledRequest(req, num_new, req.num_computed_tokens, num_spec))
            budget -= num_new
            i += 1

        # 2. Waiting requests, first come first served (not in a step that had to preempt).
        max_len = self.config.max_model_len
        reserve = outstanding_growth(self.running, self.kv, max_len) if self.reserve else -1
        while (
            self.waiting
            and budget > 0
            and not out.preempted
            and len(self.running) - num_done < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            if req.num_placeholders:  # preempted with its token in flight: not yet
                break
            hits: list[Block] = []
            num_hit_tokens = 0
            if req.num_computed_tokens == 0:
                hits, num_hit_tokens = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - req.num_computed_tokens - num_hit_tokens
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if reserve >= 0 and self._no_room(req, len(hits), reserve):
                break  # HEADRACE_ADMISSION=reserve: no room for everyone's full length
            if not self.kv.allocate_slots(req, num_new, hits, num_lookahead_tokens=lookahead):
                break
            if reserve >= 0:
                reserve += self._full_length(req) - len(self.kv.block_table(req.request_id))
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:  # first admission: record prefix hits
                req.num_cached_tokens = num_hit_tokens
                req.first_scheduled_at = time.monotonic()
            req.num_computed_tokens += num_hit_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new, req.num_computed_tokens))
            budget -= num_new

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return self._with_block_tables(out)

    def _full_length(self, req: Request) -> int:
        return final_blocks(req, self.kv.block_size, self.config.max_model_len)

    def _no_room(self, req: Request, num_hits: int, reserve: int) -> bool:
        """Would admitting `req` leave too few blocks for every request's full length?
        Alone, a request always runs (and is preempted if it must)."""
        need = self._full_length(req) - num_hits + reserve
        return bool(self.running) and need > self.kv.num_free_blocks

    def _with_block_tables(self, out: SchedulerOutput) -> SchedulerOutput:
        """What the model runner needs of the KV manager: each request's block table."""
        out.block_size = self.kv.block_size
        for sr in out.scheduled:
            rid = sr.request.request_id
            sr.block_table = self.kv.block_table(rid)
            sr.kv_offset, sr.layer_shift = self.kv.kv_layout(rid)
        return out

    def update(
        self, out: SchedulerOutput, new_tokens: list[list[int]]
    ) -> list[tuple[Request, list[int]]]:
        """Apply a step's results: `new_tokens[i]` are the tokens scheduled[i] produced.

        A request that sampled produced 1 token, or with speculation its accepted proposals
        plus one; a prefill chunk that did not reach the end produced none. Returns each
        scheduled request with the tokens it gained (trimmed at a stop), finished ones
        already retired.
        """
        results: list[tuple[Request, list[int]]] = []
        for sr, tokens in zip(out.scheduled, new_tokens, strict=True):
            req = sr.request
            if req.is_finished:
                # Aborted, or (async scheduling) finished by the step before this one,
                # which was still running when this step was launched: drop its token.
                continue
            req.spec_token_ids = []
            if not sr.samples:
                req.num_computed_tokens += sr.num_new_tokens
                results.append((req, []))
                continue
            # Accepted proposals had their KV computed this step; the last token has none yet.
            num_accepted = len(tokens) - 1
            req.num_computed_tokens = sr.end - sr.num_spec_tokens + num_accepted
            kept: list[int] = []
            for t in tokens:
                req.append_token(t)
                kept.append(t)
                if req.check_stop(self.config.max_model_len):
                    break
            # Never count more computed tokens than the request now has.
            req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
            if req.finish_reason is not None:
                self.finish(req)
            results.append((req, kept))
        return results

    # ---- async scheduling: schedule the next step before this one's tokens are known ---------
    def advance(self, out: SchedulerOutput) -> None:
        """Account for a step just launched as if it had run: its computed tokens count,
        and each request that samples holds a placeholder for its token until `resolve`.
        The next schedule() then plans exactly what a synchronous one would after this
        step, for requests this step does not finish (vLLM v1's async scheduler)."""
        for sr in out.scheduled:
            req = sr.request
            req.num_computed_tokens = sr.end
            req.spec_token_ids = []
            if sr.samples:
                req.num_placeholders += 1

    def resolve(
        self, out: SchedulerOutput, new_tokens: list[list[int]]
    ) -> list[tuple[Request, list[int]]]:
        """Apply an advanced step's sampled tokens (`update` for async scheduling).

        Each placeholder becomes its token; a request that this token finishes is retired,
        and whatever the step launched after this one computed for it is dropped later
        (update() and resolve() skip finished requests). A request preempted since the
        launch still takes its token: it recomputes it with the rest when readmitted.
        """
        results: list[tuple[Request, list[int]]] = []
        for sr, tokens in zip(out.scheduled, new_tokens, strict=True):
            req = sr.request
            if req.is_finished:
                continue
            if not sr.samples:
                results.append((req, []))
                continue
            assert len(tokens) == 1 and req.num_placeholders > 0, (req, tokens)
            req.num_placeholders -= 1
            req.append_token(tokens[0])
            if req.check_stop(self.config.max_model_len):
                req.num_placeholders = 0  # the next step's token for it is void
                if req.status == RequestStatus.RUNNING:
                    self.running.remove(req)
                else:
                    self.waiting.remove(req)
                self._finish(req)
            results.append((req, tokens))
        return results

    def _finishes_in_flight(self, req: Request) -> bool:
        """Will the token in flight end `req` by length (known before the token is)?
        (Attributes, not the properties: this runs per running request per step.)"""
        placeholders = req.num_placeholders
        return (
            len(req.output_token_ids) + placeholders >= req.params.max_tokens  # type: ignore[operator]
            or len(req.all_token_ids) + placeholders >= self.config.max_model_len
        )

    def _preempt(self, req: Request) -> None:
        """Free everything the request holds; it recomputes from scratch when readmitted."""
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.kv_compression_pending = req.kv_compression is not None  # recompress
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
