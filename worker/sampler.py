"""The batched sampler: one step's logits [B, V] in, one token per row out, all on device.

Every row has its own SamplingParams; rows are never split into groups or looped over on
the device. Per-row parameters become small tensors built on the host once per call; the
host reads nothing back from the device.

Order of processing (vLLM v1's):

    raw logits ──────────────────────────────────────────────────────► logprobs (if asked)
      │
      min_tokens: while len(output) < min_tokens, EOS and stop_token_ids get -inf
      repetition penalty (prompt + output tokens): logit > 0 → logit / r, else logit * r
      frequency / presence (output tokens): logit -= f * count + p * (count > 0)
      │
      ├─ greedy rows (temperature < 1e-5) ─► argmax
      │
      temperature → min_p → top_k → top_p → softmax → exponential race ─► token

Filtering keeps tokens by value thresholds, so ties never depend on sort order:
  - min_p keeps p >= min_p * p_max;
  - top_k keeps every token whose logit ties the k-th largest (so more than k may survive);
  - top_p keeps the smallest descending prefix whose mass reaches top_p (the top token
    always), plus anything tied with the last token of that prefix. Its mass is measured
    after min_p and top_k have removed tokens and the rest renormalized.
Dropped tokens get a logit of -inf, so their probability is exactly 0.

Sampling is the exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) is a draw from p
(Gumbel-max in disguise); it needs no cumulative sums and no sync. Unseeded rows draw q
from one torch.Generator the Sampler owns. Seeded rows draw q from a counter-based hash of
(seed, step, token id), step = len(output_token_ids): the draw depends on nothing else, not
the batch, not the row order, not the device, so a preempted and recomputed request repeats
its tokens exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cuda.argmax import argmax_rows
from ipc.messages import SamplingParams, TokenLogprobs
from worker.device_copy import host_tensor, host_to_device
from worker.sampling_tensors import (
    GREEDY_EPS,
    RowParams,
    apply_allowed,
    apply_pool_penalties,
    row_params,
    seeded_keys,
)
from worker.structured import apply_bitmask

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def plain_greedy(params: SamplingParams, num_output_tokens: int) -> bool:
    """Whether `draw` gives this row the raw argmax of its logits and nothing else is asked
    of the sampler: greedy, no logprobs, no penalties, no logit_bias or allowed_token_ids,
    no min_tokens ban in force (a grammar mask is the caller's to rule out). Such rows can take their token from the
    decode CUDA graph's own argmax (worker/cuda_graphs.py)."""
    return (
        params.temperature < GREEDY_EPS
        and params.logprobs is None
        and params.repetition_penalty == 1.0
        and params.frequency_penalty == 0.0
        and params.presence_penalty == 0.0
        and num_output_tokens >= params.min_tokens
        and not params.logit_bias
        and params.allowed_token_ids is None
    )


def argmax_tokens(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B] each row's argmax over the real vocabulary (columns past it are embedding
    padding): what `draw` returns when every row is `plain_greedy`."""
    return argmax_rows(logits[:, :vocab_size])


@dataclass
class SamplingBatch:
    """One step's sampling inputs, built on the host by the model runner; one entry per row."""

    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]  # for repetition_penalty
    output_token_ids: list[list[int]]  # generated so far: penalties, min_tokens, seeded step
    # The step index of each row's draw; defaults to len(output_token_ids[i]). Speculative
    # decoding can set it when it samples several positions of one request in one call.
    steps: list[int] | None = field(default=None)
    # Structured output: [B, ceil(V/32)] int32 on device, bit t of row i = token t allowed
    # (worker/structured.py); None when no row is constrained.
    bitmask: torch.Tensor | None = field(default=None)
    # The rows' params as device tensors, kept across steps (worker/sampling_rows.py);
    # None: the sampler builds them from `params` for this call.
    rows: RowParams | None = field(default=None)


@dataclass
class LogprobsTensors:
    """Logprobs for each row, on device: the chosen token first, then the top K."""

    token_ids: torch.Tensor  # [B, 1 + K] int64: the sampled token, then the top-K ids
    logprobs: torch.Tensor  # [B, 1 + K] float32
    ranks: torch.Tensor  # [B] int64: 1-based rank of the sampled token

    def to_lists(self, num_per_row: list[int]) -> list[TokenLogprobs]:
        """Copy to the host (one transfer per tensor) and trim row i to 1 + num_per_row[i]."""
        token_ids = self.token_ids.tolist()
        logprobs = self.logprobs.tolist()
        ranks = self.ranks.tolist()
        return [
            TokenLogprobs(token_ids=ids[: 1 + k], logprobs=lps[: 1 + k], rank=rank)
            for ids, lps, rank, k in zip(token_ids, logprobs, ranks, num_per_row, strict=True)
        ]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, on device
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> LogprobsTensors:
    """Logprobs of `token_ids` [B] and the `num_top` most likely tokens under logits [B, V].

    Also serves prompt logprobs (rows are prompt positions, token_ids the next prompt
    tokens). A token's rank counts every token at least as likely, so ties rank it last.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = logprobs.gather(1, token_ids.view(-1, 1))  # [B, 1]
    ranks = (logprobs >= chosen).sum(dim=-1)  # [B]
    if num_top > 0:
        top_lps, top_ids = logprobs.topk(num_top, dim=-1)  # [B, K], sorted descending
        ids = torch.cat([token_ids.view(-1, 1), top_ids], dim=1)
        lps = torch.cat([chosen, top_lps], dim=1)
    else:
        ids, lps = token_ids.view(-1, 1), chosen
    return LogprobsTensors(token_ids=ids.long(), logprobs=lps, ranks=ranks)


class Sampler:
    """Turns logits into tokens for a batch of rows with mixed sampling params."""

    def __init__(self, vocab_size: int, eos_token_ids: set[int], seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.seed = seed  # seeds the generator of unseeded rows
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        params = batch.params
        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(f"logits must be [{len(params)}, V], got {list(logits.shape)}")
        batch = self.with_rows(batch, logits.device)
        token_ids = self.draw(logits, batch)
        assert batch.rows is not None
        num_top = batch.rows.num_top_logprobs
        # Columns past the vocabulary are padding of the embedding, never real tokens.
        raw = logits[:, : self.vocab_size]
        logprobs = None if num_top is None else compute_logprobs(raw, token_ids, num_top)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def draw(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """[B] each row's token: the plain decode draw, also n-gram verification's (a seeded
        row's token depends only on its logits, seed and step)."""
        batch = self.with_rows(batch, logits.device)
        rows = batch.rows
        assert rows is not None
        if rows.all_greedy and _unprocessed(batch):
            # No fp32 copy: the argmax reads the logits as they are (16-bit ones too, from
            # greedy_logits: widening is exact and keeps the order).
            return argmax_rows(logits[:, : self.vocab_size])
        x = self._processed_logits(logits, batch)  # [B, V] float32, ours to modify in place
        if rows.all_greedy:
            return argmax_rows(x)  # what argmax_tokens computes: the same kernel
        if rows.is_greedy is not None:
            argmax = x.argmax(dim=-1)  # before _sample rescales and filters x in place
            return torch.where(rows.is_greedy, argmax, self._sample(x, batch))
        return self._sample(x, batch)

    def with_rows(self, batch: SamplingBatch, device: torch.device) -> SamplingBatch:
        """`batch` with its RowParams: kept ones, or built from its params now."""
        if batch.rows is not None:
            return batch
        rows = row_params(batch.params, self.vocab_size, self.eos_token_ids, device)
        return dataclasses.replace(batch, rows=rows)

    def _processed_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """A float32 copy of logits [B, >= V] after the grammar mask, min_tokens, penalties."""
        rows = batch.rows
        assert rows is not None
        x = logits[:, : self.vocab_size].to(torch.float32, copy=True)
        if batch.bitmask is not None:
            apply_bitmask(x, batch.bitmask)
        # vLLM's order: allowed tokens, min_tokens, logit_bias, then the penalties.
        if rows.allowed is not None:
            apply_allowed(x, rows.allowed)
        self._apply_min_tokens(x, batch)
        if rows.bias is not None:
            x.view(-1).index_add_(0, rows.bias.index, rows.bias.values)
        if rows.pool is not None:
            apply_pool_penalties(x, rows)  # counts kept across steps
        else:
            _apply_penalties(x, batch)  # counts from the token lists
        return x

    def _apply_min_tokens(self, x: torch.Tensor, batch: SamplingBatch) -> None:
        """Forbid EOS and stop ids in rows that have not yet produced min_tokens tokens."""
        assert batch.rows is not None
        vocab = x.shape[1]
        flat: list[int] = []  # row * vocab + token
        outputs = batch.output_token_ids
        for i, min_tokens, banned in batch.rows.min_tokens:
            if len(outputs[i]) < min_tokens:
                flat.extend(i * vocab + t for t in banned)
        if flat:
            x.view(-1).index_fill_(0, host_tensor(flat, torch.int64, x.device), -math.inf)

    def _sample(self, x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Random rows: temperature, min_p, top_k, top_p, then one draw each. Modifies x."""
        probs = self._filtered_probs(x, batch)
        q = self._exponential_noise(probs, batch)
        return probs.div_(q).argmax(dim=-1)

    def _filtered_probs(self, x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Temperature, min_p, top_k, top_p, softmax: each row's distribution. Modifies x."""
        rows = batch.rows
        assert rows is not None
        # Greedy rows ride along at temperature 1; their draw is discarded.
        x.div_(rows.temperatures.view(-1, 1))
        if rows.min_p is not None:
            _apply_min_p(x, rows.min_p)
        if rows.top_p is not None:
            _apply_top_k_top_p(x, rows.top_k_tensor, rows.top_p)
        elif any(rows.top_k):
            _apply_top_k(x, rows.top_k_tensor, max(rows.top_k))

        return torch.softmax(x, dim=-1)  # dropped tokens: exactly 0

    def greedy_tokens(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """[B] the token a greedy row picks: the argmax after min_tokens and penalties."""
        batch = self.with_rows(batch, logits.device)
        return self._processed_logits(logits, batch).argmax(dim=-1)

    def processed_probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The distribution each row draws from after all processing: [B, V] float32.

        What draft-model verification (rejection sampling) verifies against; n-gram
        verification uses `draw` instead. Greedy rows are one-hot at the argmax the plain
        path would pick, so rejection sampling reduces to "proposal == argmax".
        """
        batch = self.with_rows(batch, logits.device)
        rows = batch.rows
        assert rows is not None
        x = self._processed_logits(logits, batch)
        if rows.all_greedy:
            return torch.zeros_like(x).scatter_(1, x.argmax(dim=-1, keepdim=True), 1.0)
        argmax = x.argmax(dim=-1, keepdim=True) if rows.is_greedy is not None else None
        probs = self._filtered_probs(x, batch)
        if argmax is not None and rows.is_greedy is not None:
            one_hot = torch.zeros_like(probs).scatter_(1, argmax, 1.0)
            probs = torch.where(rows.is_greedy.view(-1, 1), one_hot, probs)
        return probs

    def exponential_noise(
        self, probs: torch.Tensor, batch: SamplingBatch, salt: int
    ) -> torch.Tensor:
        """Exp(1) noise shaped like probs [B, V] for another purpose than the plain draw.

        Each purpose (acceptance test, draft proposal) gets its own `salt`, so seeded rows
        draw independent streams keyed by (seed, step, purpose); salt 0 is the plain draw.
        """
        return self._exponential_noise(probs, self.with_rows(batch, probs.device), salt)

    def _exponential_noise(
        self, probs: torch.Tensor, batch: SamplingBatch, salt: int = 0
    ) -> torch.Tensor:
        """q [B, V] ~ Exp(1): seeded rows from their (seed, step) hash, others from our generator."""
        rows = batch.rows
        assert rows is not None
        q = torch.empty_like(probs).exponential_(generator=self._generator(probs.device))
        if rows.seeded_index is not None:
            steps = batch.steps or [len(out) for out in batch.output_token_ids]
            # Salts use only the high 32 bits, steps the low ones: (step, salt) never collide.
            noise = _exponential_of_keys(seeded_keys(rows, steps, salt), probs.shape[1])
            q.index_copy_(0, rows.seeded_index, noise)
        return q

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen


def _unprocessed(batch: SamplingBatch) -> bool:
    """Whether _processed_logits would leave every row's logits as they are: no grammar
    mask, allowed list, min_tokens ban in force, logit_bias or penalty."""
    rows = batch.rows
    assert rows is not None
    if batch.bitmask is not None or rows.allowed is not None or rows.bias is not None:
        return False
    outputs = batch.output_token_ids
    if any(len(outputs[i]) < min_tokens for i, min_tokens, _ in rows.min_tokens):
        return False
    if rows.pool is not None:
        return rows.penalties is None
    return not any(
        p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        for p in batch.params
    )


def _apply_penalties(x: torch.Tensor, batch: SamplingBatch) -> None:
    """Repetition (prompt + output) then frequency and presence (output only), in place."""
    params = batch.params
    vocab = x.shape[1]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = torch.zeros_like(x, dtype=torch.bool)
        index = _flat_index(vocab, x.device, batch.prompt_token_ids, batch.output_token_ids)
        seen.view(-1).index_fill_(0, index, True)
        r = host_tensor([p.repetition_penalty for p in params], torch.float32, x.device)
        r = r.view(-1, 1).expand_as(x)
        penalized = torch.where(x > 0, x / r, x * r)
        torch.where(seen, penalized, x, out=x)
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        counts = torch.zeros_like(x)
        flat = _flat_index(vocab, x.device, batch.output_token_ids)
        counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=x.dtype))
        fp = [[p.frequency_penalty, p.presence_penalty] for p in params]
        freq, pres = host_tensor(fp, torch.float32, x.device).T.unsqueeze(-1)  # [B, 1] each
        x.sub_(counts * freq + (counts > 0).to(x.dtype) * pres)


def _apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens with p < min_p * p_max (min_p [B]); min_p 0 keeps every token."""
    probs = torch.softmax(x, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.view(-1, 1)
    x.masked_fill_(probs < threshold, -math.inf)


def _apply_top_k(x: torch.Tensor, k: torch.Tensor, max_k: int) -> None:
    """Top-k alone needs no full sort: topk(max k) gives every row's k-th value."""
    # k: [B], 0 = off
    top = x.topk(max_k, dim=-1).values  # [B, max_k] descending
    kth = top.gather(1, (k - 1).clamp(min=0).view(-1, 1))
    kth = kth.masked_fill_((k == 0).view(-1, 1), -math.inf)
    x.masked_fill_(x < kth, -math.inf)  # ties with the k-th value survive


def _apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    """Top-k (k [B], 0 = off) then top-p (p [B], 1 = off) as one value threshold per row."""
    sorted_x = x.sort(dim=-1, descending=True).values  # [B, V]
    kth = sorted_x.gather(1, (top_k - 1).clamp(min=0).view(-1, 1))  # [B, 1]
    kth = kth.masked_fill_((top_k == 0).view(-1, 1), -math.inf)
    sorted_x.masked_fill_(sorted_x < kth, -math.inf)
    probs = torch.softmax(sorted_x, dim=-1)
    # A token stays if the mass strictly before it is < top_p: the first always does.
    mass_before = probs.cumsum(dim=-1) - probs
    num_kept = (mass_before < top_p.view(-1, 1)).sum(dim=-1, keepdim=True)  # [B, 1] >= 1
    threshold = sorted_x.gather(1, (num_kept - 1).clamp(min=0))  # [B, 1]
    # The max matters where top_p keeps every token top_k left: threshold is then -inf.
    x.masked_fill_(x < torch.maximum(threshold, kth), -math.inf)


def seeded_exponential(keys: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [len(keys), vocab]: element (r, t) is a pure function of (keys[r], t).

    Two keyed rounds of a 32-bit integer hash (Wellons' lowbias32 variant with multipliers
    below 2**31, so int64 products never overflow) map each token id to 32 random bits; the
    top 24 make u in (0, 1) and q = -log(u). Keys go through splitmix64 first, so rows of
    neighbouring keys are unrelated. Integer math is exact: CPU and GPU agree bit for bit on
    u (and on q to an ulp), so a seeded request draws the same tokens on either.

    Cost: about 20 elementwise int64 passes over [S, V]; an all-seeded batch of 256 rows at
    V = 128k takes about 4 ms on an H200 (vs 0.5 ms unseeded). A fused kernel would fix it.
    """
    mixed = [_splitmix64(key & _MASK64) for key in keys]  # neighbouring keys, unrelated rows
    k = host_tensor([[m & _MASK32, m >> 32] for m in mixed], torch.int64, device)
    return _exponential_of_keys(k, vocab)


def _exponential_of_keys(k: torch.Tensor, vocab: int) -> torch.Tensor:
    """seeded_exponential's noise from its mixed keys k [S, 2] int64 (low, high 32 bits)."""
    h = torch.arange(vocab, dtype=torch.int64, device=k.device).expand(k.shape[0], vocab)
    h = _mix32(h ^ k[:, :1])
    h = _mix32(h ^ k[:, 1:])
    u = ((h >> 8).to(torch.float32) + 0.5) * 2.0**-24
    return u.log_().neg_()


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x ^= x >> 15
    x = (x * 0x735A2D97) & _MASK32
    x ^= x >> 15
    return x


def _row_key(seed: int, step: int) -> int:
    """64-bit key of one seeded draw: (seed, step) pairs must not collide as seed ^ step would."""
    return _splitmix64(seed & _MASK64) ^ (step & _MASK64)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _flat_index(vocab: int, device: torch.device, *groups: list[list[int]]) -> torch.Tensor:
    """row * vocab + token for every token < vocab in each group's rows, on device.

    numpy walks the Python lists about four times faster than torch.tensor does.
    """
    parts = []
    for ids in groups:
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum()))
        flat = np.repeat(np.arange(len(ids), dtype=np.int64) * vocab, lengths) + tokens
        parts.append(flat[tokens < vocab])
    return host_to_device(torch.from_numpy(np.concatenate(parts)), device)
