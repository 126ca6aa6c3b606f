"""Speculative decoding: a proposer guesses k tokens, the target verifies them in one step.

    step t:   schedule -> target runs 1 + k rows per speculating request -> rejection
              sampling emits accepted proposals + 1 -> scheduler.update -> proposer sets
              spec_token_ids for the requests in decode
    step t+1: the scheduler computes those proposals as extra tokens (budget, KV slots)

Proposers: `ngram` (prompt lookup, worker/spec_decode/ngram.py) and `draft` (a small model,
worker/spec_decode/draft.py). Verification: verify.py and rejection.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from worker.config import EngineConfig
from worker.request import Request, RequestStatus
from worker.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from worker.model_config import ModelConfig


class Proposer(Protocol):
    # Request id -> the draft distributions q [k, V] of its current proposals; empty when q
    # is a point mass (n-gram). The model runner reads it when verifying.
    draft_probs: dict[str, torch.Tensor]

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        """At most num_tokens[i] proposals continuing requests[i]'s tokens."""
        ...

    def retain(self, request_ids: set[str]) -> None:
        """Forget (and free the state of) every request not in `request_ids`."""
        ...

    def release(self) -> None:
        """Free the proposer's device memory (EngineCore.shutdown); it proposes no more."""
        ...


@dataclass(frozen=True)
class Target:
    """What a proposer is told of the model it proposes for."""

    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    num_blocks: int  # the target's KV cache blocks
    max_model_len: int
    eos_token_ids: frozenset[int]


def draft_extra_blocks(config: EngineConfig) -> int:
    """KV blocks a draft model needs beyond the target's: k slots per request (the draft
    holds the same tokens as the target, plus the proposals it fed). `config` has its
    batch limits resolved (EngineCore._with_batch_limits)."""
    assert config.max_num_seqs is not None
    return config.max_num_seqs * -(-config.num_speculative_tokens // config.block_size)


def make_proposer(config: EngineConfig, target: Target) -> Proposer | None:
    """The proposer the config asks for; None without speculation (k == 0 or no method)."""
    method = config.speculative_method or ("draft" if config.speculative_model else None)
    if method is None or config.num_speculative_tokens == 0:
        return None
    if method == "ngram":
        from worker.spec_decode.ngram import NgramProposer

        return NgramProposer(config.ngram_prompt_lookup_min, config.ngram_prompt_lookup_max)
    from worker.spec_decode.draft import DraftProposer

    proposer = DraftProposer(config, target)
    if target.device.type == "cuda" and not config.enforce_eager:
        assert config.max_num_seqs is not None  # resolved by the engine
        proposer.capture_cuda_graphs(config.max_num_seqs)
    return proposer


@dataclass
class SpecStats:
    """Counters for WorkerStats. A step is one request's verification of its proposals, so
    the mean accepted length per step is accepted / steps (+ 1 for the bonus token)."""

    proposed: int = 0
    accepted: int = 0
    steps: int = 0

    def count(self, sched: SchedulerOutput, new_tokens: list[list[int]]) -> None:
        for sr, tokens in zip(sched.scheduled, new_tokens, strict=True):
            if sr.num_spec_tokens and tokens:
                self.proposed += sr.num_spec_tokens
                self.accepted += len(tokens) - 1
                self.steps += 1


def set_proposals(
    proposer: Proposer,
    scheduled: list[Request],
    running: list[Request],
    num_speculative_tokens: int,
    max_model_len: int,
) -> None:
    """After scheduler.update: proposals for the scheduled requests that are now in decode.

    A step with k proposals emits up to k + 1 tokens, so k stops one short of max_tokens
    and max_model_len. Running requests that were not scheduled keep their proposals.
    """
    proposer.retain({r.request_id for r in running})
    decode = [
        r
        for r in scheduled
        if r.status == RequestStatus.RUNNING and r.num_computed_tokens == r.num_tokens - 1
    ]
    nums = [
        max(
            0,
            min(
                num_speculative_tokens,
                r.max_tokens - r.num_output_tokens - 1,
                max_model_len - r.num_tokens - 1,
            ),
        )
        for r in decode
    ]
    for req, spec in zip(decode, proposer.propose(decode, nums), strict=True):
        req.spec_token_ids = spec
