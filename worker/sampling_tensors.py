"""A step's sampling params as device tensors, and the per-request penalty pool.

`RowParams` is everything the sampler reads of the rows' SamplingParams, already on the
device: temperatures, filters, which rows are greedy or seeded, min_tokens bans, and
where each penalized row's counts live. `row_params` builds one from a list of params
(what every step used to do in the sampler); worker/sampling_rows.py keeps one across
steps and rebuilds it only when the rows change.

The penalty pool (`PenaltyPool`) holds one device row per request with a penalty:

    seen    [slots, V] bool     prompt + output tokens (repetition penalty)
    counts  [slots, V] float32  output token counts (frequency / presence penalty)

A slot is written from the request's prompt once, when it joins; each step then adds only
the output tokens produced since the last (`update`), so no step walks a request's whole
token lists. Counts are small integers, exact in float32, so the penalized logits equal
those of the per-step rebuild bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ipc.messages import SamplingParams
from worker.device_copy import host_tensor, host_to_device

GREEDY_EPS = 1e-5  # temperature below this means greedy, as SamplingParams.greedy says
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


@dataclass
class PenaltyRows:
    """The step's rows with a penalty and their pool slots (row order)."""

    rows: torch.Tensor  # [P] int64 batch rows
    slots: torch.Tensor  # [P] int64 pool slots
    repetition: torch.Tensor | None  # [P, 1] float32, None when no row has one
    frequency: torch.Tensor | None  # [P, 1] float32, None when no row has freq/presence
    presence: torch.Tensor | None  # [P, 1] float32
    all_rows: bool  # rows == 0..B-1: no gather / scatter of the logits


@dataclass
class TokenValues:
    """logit_bias entries of a step's logits: flat indexes row * V + token, and values."""

    index: torch.Tensor  # [E] int64
    values: torch.Tensor  # [E] float32


@dataclass
class AllowedTokens:
    """Rows limited to a token list (allowed_token_ids): every other logit becomes -inf."""

    rows: torch.Tensor  # [A] int64 batch rows
    keep: torch.Tensor  # [E] int64 flat indexes a * V + token into those A rows


@dataclass
class RowParams:
    """One step's sampling params as the sampler reads them; one entry per row."""

    greedy: list[bool]
    temperatures: torch.Tensor  # [B] float32; greedy rows ride along at 1.0
    is_greedy: torch.Tensor | None  # [B] bool, only for a batch mixing greedy and random
    min_p: torch.Tensor | None  # [B] float32, None when no row filters by min_p
    top_k: list[int]  # 0 = off (also k >= V)
    top_k_tensor: torch.Tensor  # [B] int64
    top_p: torch.Tensor | None  # [B] float32, inf = off; None when no row filters by top_p
    num_top_logprobs: int | None  # the most top logprobs a row asks for
    seeded: list[int]  # rows with a seed
    seeded_index: torch.Tensor | None  # [S] int64 of `seeded`
    seed_mix: np.ndarray  # [S] uint64: splitmix64(seed) of each seeded row
    # min_tokens: (row, min_tokens, the ids it bans until then) for rows with min_tokens
    min_tokens: list[tuple[int, int, list[int]]] = field(default_factory=list)
    # Penalties from the pool (persistent rows); None: none, or read from the lists.
    penalties: PenaltyRows | None = None
    pool: PenaltyPool | None = None
    bias: TokenValues | None = None  # logit_bias entries, added after min_tokens
    allowed: AllowedTokens | None = None  # allowed_token_ids rows

    @property
    def all_greedy(self) -> bool:
        return all(self.greedy)


def row_params(
    params: Sequence[SamplingParams],
    vocab: int,
    eos_token_ids: Sequence[int],
    device: torch.device,
) -> RowParams:
    """RowParams of `params` (no penalties: the caller adds them, or the sampler reads
    them from the batch's token lists)."""
    greedy = [p.temperature < GREEDY_EPS for p in params]
    temps = [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    seeded = [i for i, p in enumerate(params) if p.seed is not None]
    mixed = any(greedy) and not all(greedy)
    eos = sorted(eos_token_ids)
    return RowParams(
        greedy=greedy,
        temperatures=host_tensor(temps, torch.float32, device),
        is_greedy=host_tensor(greedy, torch.bool, device) if mixed else None,
        min_p=(
            host_tensor([p.min_p for p in params], torch.float32, device)
            if any(p.min_p > 0 for p in params)
            else None
        ),
        top_k=top_k,
        top_k_tensor=host_tensor(top_k, torch.int64, device),
        top_p=(
            # Off must mean off: a float cumsum can pass 1.0 before the last token.
            host_tensor(
                [p.top_p if p.top_p < 1.0 else math.inf for p in params], torch.float32, device
            )
            if any(p.top_p < 1.0 for p in params)
            else None
        ),
        num_top_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=None),
        seeded=seeded,
        seeded_index=host_tensor(seeded, torch.int64, device) if seeded else None,
        seed_mix=splitmix64_np(
            np.array([(params[i].seed or 0) & _MASK64 for i in seeded], dtype=np.uint64)
        ),
        min_tokens=[
            (i, p.min_tokens, [t for t in sorted(set(eos).union(p.stop_token_ids)) if t < vocab])
            for i, p in enumerate(params)
            if p.min_tokens > 0
        ],
        bias=logit_bias_entries(params, vocab, device),
        allowed=allowed_tokens(params, vocab, device),
    )


def logit_bias_entries(
    params: Sequence[SamplingParams], vocab: int, device: torch.device
) -> TokenValues | None:
    """The rows' logit_bias as flat (row * V + token, value) entries; None without any."""
    flat: list[int] = []
    values: list[float] = []
    for i, p in enumerate(params):
        for token, value in (p.logit_bias or {}).items():
            if 0 <= token < vocab:  # admission checked the ids; padding ids never exist
                flat.append(i * vocab + token)
                values.append(value)
    if not flat:
        return None
    return TokenValues(
        host_tensor(flat, torch.int64, device), host_tensor(values, torch.float32, device)
    )


def allowed_tokens(
    params: Sequence[SamplingParams], vocab: int, device: torch.device
) -> AllowedTokens | None:
    """The rows limited by allowed_token_ids, and the flat indexes they keep."""
    rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    if not rows:
        return None
    keep = [
        a * vocab + t
        for a, i in enumerate(rows)
        for t in set(params[i].allowed_token_ids or ())
        if 0 <= t < vocab
    ]
    return AllowedTokens(
        host_tensor(rows, torch.int64, device), host_tensor(keep, torch.int64, device)
    )


def apply_allowed(x: torch.Tensor, allowed: AllowedTokens) -> None:
    """Every logit of the limited rows but their allowed tokens becomes -inf (in place)."""
    sub = x.index_select(0, allowed.rows)  # [A, V]
    mask = torch.ones_like(sub, dtype=torch.bool)
    mask.view(-1).index_fill_(0, allowed.keep, False)
    x.index_copy_(0, allowed.rows, sub.masked_fill_(mask, -math.inf))


def has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


class PenaltyPool:
    """Per-request penalty rows on the device (see the module docstring)."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.device = device
        self.seen = torch.zeros((0, vocab), dtype=torch.bool, device=device)
        self.counts = torch.zeros((0, vocab), dtype=torch.float32, device=device)
        self.slot_of: dict[str, int] = {}
        self.counted: dict[str, int] = {}  # output tokens already in the slot
        self.free: list[int] = []

    def join(self, request_id: str, prompt: Sequence[int]) -> int:
        """A slot for a request: its prompt marked seen, no counts yet."""
        if not self.free:
            self._grow()
        slot = self.free.pop()
        self.seen[slot].zero_()
        self.counts[slot].zero_()
        ids = [t for t in prompt if t < self.vocab]
        if ids:
            self.seen[slot].index_fill_(0, host_tensor(ids, torch.int64, self.device), True)
        self.slot_of[request_id] = slot
        self.counted[request_id] = 0
        return slot

    def leave(self, request_id: str) -> None:
        slot = self.slot_of.pop(request_id, None)
        if slot is not None:
            self.counted.pop(request_id, None)
            self.free.append(slot)

    def update(self, rows: Sequence[tuple[str, Sequence[int]]]) -> None:
        """Add each request's output tokens past what its slot holds (request id, output)."""
        slots: list[int] = []
        tokens: list[int] = []
        for rid, out in rows:
            done = self.counted[rid]
            if len(out) > done:
                new = [t for t in out[done:] if t < self.vocab]
                slots.extend([self.slot_of[rid]] * len(new))
                tokens.extend(new)
                self.counted[rid] = len(out)
        if tokens:
            index = (
                host_tensor(slots, torch.int64, self.device),
                host_tensor(tokens, torch.int64, self.device),
            )
            self.seen.index_put_(index, torch.ones((), dtype=torch.bool, device=self.device))
            ones = torch.ones(len(tokens), dtype=torch.float32, device=self.device)
            self.counts.index_put_(index, ones, accumulate=True)

    def _grow(self) -> None:
        old = self.seen.shape[0]
        cap = max(2 * old, 8)
        seen = torch.zeros((cap, self.vocab), dtype=torch.bool, device=self.device)
        counts = torch.zeros((cap, self.vocab), dtype=torch.float32, device=self.device)
        seen[:old] = self.seen
        counts[:old] = self.counts
        self.seen, self.counts = seen, counts
        self.free.extend(range(cap - 1, old - 1, -1))


def apply_pool_penalties(x: torch.Tensor, rows: RowParams) -> None:
    """Repetition (prompt + output) then frequency and presence (output), in place, for
    the penalized rows only: a row without a penalty is left as the full-batch formula
    leaves it (x / 1, x - 0)."""
    pen, pool = rows.penalties, rows.pool
    if pen is None or pool is None:
        return
    xs = x if pen.all_rows else x.index_select(0, pen.rows)  # [P, V]
    if pen.repetition is not None:
        seen = pool.seen.index_select(0, pen.slots)
        r = pen.repetition.expand_as(xs)
        xs = torch.where(seen, torch.where(xs > 0, xs / r, xs * r), xs)
    if pen.frequency is not None and pen.presence is not None:
        counts = pool.counts.index_select(0, pen.slots)
        xs = xs - (counts * pen.frequency + (counts > 0).to(xs.dtype) * pen.presence)
    if pen.all_rows:
        x.copy_(xs)
    else:
        x.index_copy_(0, pen.rows, xs)


def seeded_keys(rows: RowParams, steps: Sequence[int], salt: int) -> torch.Tensor:
    """[S, 2] int64 hash keys of the seeded rows' draws (see sampler.seeded_exponential):
    the numpy twin of `_row_key` then splitmix64, one vector pass for all rows."""
    step = np.array([steps[i] for i in rows.seeded], dtype=np.uint64)
    keys = rows.seed_mix ^ step ^ np.uint64((salt << 32) & _MASK64)
    mixed = splitmix64_np(keys)
    k = np.stack([mixed & np.uint64(_MASK32), mixed >> np.uint64(32)], axis=1)
    return host_to_device(torch.from_numpy(k.astype(np.int64)), rows.temperatures.device)


def splitmix64_np(z: np.ndarray) -> np.ndarray:
    """splitmix64 of each uint64 (wrapping arithmetic, as the Python version masks)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
