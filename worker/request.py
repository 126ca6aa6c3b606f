"""A request as the worker sees it: token ids catching up with computation.

`num_computed_tokens` chases `num_tokens` (prompt + generated). Prefill, chunked prefill,
decode and recomputation after preemption are all "compute the tokens not yet computed";
speculative tokens are extra tokens appended for one step and verified.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from ipc.messages import FinishReason, RequestOutput, SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from worker.kv_compression import KVCompressionSettings
    from worker.structured import RequestGrammar


# An engine output and the owner of its request (see Request.owner).
OwnedOutput = tuple[bytes, RequestOutput]


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED = 3


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: frozenset[int],
        arrival_time: float = 0.0,
        *,
        owner: bytes = b"",
    ) -> None:
        self.request_id = request_id
        # Who sent it, opaque here: the worker server's key (a gateway's socket identity)
        # for where its outputs go and who may abort it; b"" in process.
        self.owner = owner
        self.prompt_token_ids = prompt_token_ids
        if params.max_tokens is None:
            raise ValueError("params.max_tokens must be resolved (ipc.sampling.check_request)")
        self.params = params
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.arrival_time = arrival_time
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # Async scheduling: tokens launched steps will sample, not known on the host yet
        # (at most two: the step in flight's and the one just scheduled after it).
        self.num_placeholders = 0
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (first time)
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | None = None
        self.num_preemptions = 0
        # Tokens proposed by a speculative proposer for the next step (not yet verified).
        self.spec_token_ids: list[int] = []
        # Logprobs produced since the last output was sent, and the prompt's, if asked.
        self.pending_logprobs: list[TokenLogprobs] = []
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None
        self.prompt_logprobs_sent = False
        self.num_sent_tokens = 0  # output tokens already reported to the caller
        # Structured output: the matcher, set once the grammar has compiled.
        self.grammar: RequestGrammar | None = None
        # Queue time for metrics: engine arrival -> first scheduled (time.monotonic()).
        self.added_at = time.monotonic()
        self.first_scheduled_at: float | None = None
        self.queue_time_sent = False
        # KV cache compression (worker/kv_compression.py): the settings, and whether the
        # prefill still has to end in a compression (again after a preemption).
        self.kv_compression: KVCompressionSettings | None = None
        self.kv_compression_pending = False

    @property
    def max_tokens(self) -> int:
        assert self.params.max_tokens is not None  # resolved on admission (see __init__)
        return self.params.max_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens known or being sampled: what the scheduler computes up to."""
        return len(self.all_token_ids) + self.num_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """After appending a token: set finish_reason if the request is done (the known
        tokens decide: a placeholder behind this token is not counted)."""
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= self.params.min_tokens:
            if last in self.eos_token_ids:
                self.finish_reason = FinishReason.STOP
                return True
            if last in self.params.stop_token_ids:
                self.finish_reason = FinishReason.STOP
                self.stop_reason = last
                return True
        if self.num_output_tokens >= self.max_tokens or len(self.all_token_ids) >= max_model_len:
            self.finish_reason = FinishReason.LENGTH
            return True
        return False

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.name})"
        )
