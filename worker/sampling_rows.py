"""Sampling rows kept across steps: the sampler's half of the persistent input batch.

A step's sampling inputs used to be rebuilt from every row's SamplingParams and token
lists: params into Python lists then tensors, and for penalties every request's whole
prompt and output flattened into a fresh [B, V] mask and count (host work that grows
with every token of every request, each step). Here (as vLLM v1's InputBatch keeps them):

    rows         the step's request ids in row order; a step whose rows are the last
                 step's, in the same order (the steady decode step), reuses its RowParams
                 tensors whole; otherwise they are rebuilt once for the new layout
    penalty pool a device row per request with a penalty (worker/sampling_tensors.py):
                 written from its prompt when it joins, then only each step's new output
                 tokens are added; a finished request's slot is freed at the next layout
                 change

Tokens are the rebuild's bit for bit (tests/test_sampling_rows.py).
HEADRACE_SAMPLING_BATCH=rebuild selects the per-step rebuild (`make_sampling_rows`).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence

import torch

from worker.device_copy import host_tensor
from worker.request import Request
from worker.sampler import SamplingBatch
from worker.sampling_tensors import PenaltyPool, PenaltyRows, RowParams, has_penalty
from worker.sampling_tensors import row_params as build_row_params

ENV = "HEADRACE_SAMPLING_BATCH"
MODES = ("persistent", "rebuild")


def make_sampling_rows(
    vocab: int, eos_token_ids: Collection[int], device: torch.device, mode: str | None = None
) -> SamplingRows | None:
    """The kept rows $HEADRACE_SAMPLING_BATCH names (default persistent); None: rebuild."""
    mode = mode or os.environ.get(ENV) or "persistent"
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    return SamplingRows(vocab, eos_token_ids, device) if mode == "persistent" else None


def rebuilt_batch(
    reqs: Sequence[Request], steps: list[int] | None, bitmask: torch.Tensor | None
) -> SamplingBatch:
    """Every row from its request's params and token lists (the sampler reads them all)."""
    return SamplingBatch(
        params=[r.params for r in reqs],
        prompt_token_ids=[r.prompt_token_ids for r in reqs],
        output_token_ids=[r.output_token_ids for r in reqs],
        steps=steps,
        bitmask=bitmask,
    )


class SamplingRows:
    def __init__(self, vocab: int, eos_token_ids: Collection[int], device: torch.device) -> None:
        self.vocab = vocab
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = device
        self.order: list[str] = []  # request id of each row
        self.params: list = []  # each row's SamplingParams
        self.rows: RowParams | None = None
        self.penalized: list[int] = []  # rows with a penalty
        self.pool = PenaltyPool(vocab, device)
        self.holders: dict[str, Request] = {}  # requests holding a pool slot
        self.num_layouts = 0  # how often the rows were rebuilt (tests, benchmarks)

    def batch(
        self,
        reqs: Sequence[Request],
        steps: list[int] | None = None,
        bitmask: torch.Tensor | None = None,
    ) -> SamplingBatch:
        """The step's SamplingBatch for `reqs` (row order), penalties brought up to date."""
        ids = [r.request_id for r in reqs]
        if self.rows is None or ids != self.order:
            self._layout(reqs, ids)
        assert self.rows is not None
        if self.penalized:
            self.pool.update([(ids[i], reqs[i].output_token_ids) for i in self.penalized])
        return SamplingBatch(
            params=self.params,
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            output_token_ids=[r.output_token_ids for r in reqs],
            steps=steps,
            bitmask=bitmask,
            rows=self.rows,
        )

    def _layout(self, reqs: Sequence[Request], ids: list[str]) -> None:
        """New rows: params rebuilt, penalty slots joined (and finished ones freed)."""
        self.num_layouts += 1
        for rid, req in list(self.holders.items()):
            if req.is_finished:
                self.pool.leave(rid)
                del self.holders[rid]
        self.order = ids
        self.params = [r.params for r in reqs]
        rows = build_row_params(self.params, self.vocab, self.eos_token_ids, self.device)
        rows.pool = self.pool
        self.penalized = [i for i, p in enumerate(self.params) if has_penalty(p)]
        if self.penalized:
            rows.penalties = self._penalty_rows(reqs)
        self.rows = rows

    def _penalty_rows(self, reqs: Sequence[Request]) -> PenaltyRows:
        slots = []
        for i in self.penalized:
            req = reqs[i]
            rid = req.request_id
            if self.holders.get(rid) is not req:  # new here (or an id reused)
                self.pool.leave(rid)
                self.pool.join(rid, req.prompt_token_ids)
                self.holders[rid] = req
            slots.append(self.pool.slot_of[rid])
        pen = [self.params[i] for i in self.penalized]
        dev = self.device

        def column(values: list[float]) -> torch.Tensor:
            return host_tensor(values, torch.float32, dev).view(-1, 1)

        rep = any(p.repetition_penalty != 1.0 for p in pen)
        fp = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in pen)
        return PenaltyRows(
            rows=host_tensor(self.penalized, torch.int64, dev),
            slots=host_tensor(slots, torch.int64, dev),
            repetition=column([p.repetition_penalty for p in pen]) if rep else None,
            frequency=column([p.frequency_penalty for p in pen]) if fp else None,
            presence=column([p.presence_penalty for p in pen]) if fp else None,
            all_rows=self.penalized == list(range(len(reqs))),
        )
