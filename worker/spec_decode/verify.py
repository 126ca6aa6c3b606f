"""The target's side of one speculative step: from the 1 + k verified rows to emitted tokens.

    request with proposals [x1 x2 x3], output so far o:
      row 0 logits -> p0 = p(. | o)            verifies x1
      row 1 logits -> p1 = p(. | o x1)         verifies x2
      row 2 logits -> p2 = p(. | o x1 x2)      verifies x3
      row 3 logits -> p3 = p(. | o x1 x2 x3)   the bonus token if all are accepted

Row j is processed as the plain sampler would process a request whose output is o plus
the first j proposals (grammar mask, penalties, min_tokens), and its randomness is keyed by
output position len(o) + j.

n-gram proposals are a point mass (q = one-hot at x_j). Rejection sampling then accepts x_j
with probability p_j(x_j) and on a rejection draws from p_j without x_j, so the emitted
token's marginal is exactly p_j: the same as drawing t_j ~ p_j and accepting iff t_j == x_j.
We do the latter, with the plain decode draw itself (the exponential race on the request's
seeded stream for position len(o) + j): the emitted tokens are then exactly the tokens the
plain sampler would draw one step at a time, so a seeded request's tokens do not depend on
speculation, on how many proposals the token budget kept, or on its batch. Greedy rows are
the special case where p_j is one-hot (greedy_accept).

Draft-model proposals (q a distribution) go through true rejection sampling (rejection.py)
with separate acceptance noise: lossless, and reproducible for a fixed configuration, but
a seeded request's tokens can change with speculation or with how many proposals survive
the budget. Only the n-gram path claims batch-independent seeded draws.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ipc.messages import TokenLogprobs
from worker.input_batch import take_rows
from worker.models.base import CausalLM
from worker.request import Request
from worker.sampler import GREEDY_EPS, Sampler, SamplingBatch, compute_logprobs
from worker.spec_decode.rejection import rejection_sample

ACCEPT_SALT = 1  # randomness streams of seeded rows: see Sampler.exponential_noise
DRAFT_SALT = 2


def verify(
    model: CausalLM,
    sampler: Sampler,
    requests: list[Request],
    rows: list[list[int]],  # per request, its 1 + k rows of hidden
    hidden: torch.Tensor,  # [T, H]
    draft_probs: Mapping[str, torch.Tensor],  # request id -> [>= k, V]; empty for n-gram
    bitmask: torch.Tensor | None = None,  # structured output: one mask per row (R rows)
) -> tuple[list[list[int]], list[list[TokenLogprobs]]]:
    """Emitted tokens (accepted proposals + one) and, where asked, their logprobs."""
    ks = [len(r) - 1 for r in rows]
    logits = model.compute_logits(take_rows(hidden, [i for r in rows for i in r]))  # [R, V]
    batch, index = _row_batch(requests, ks, bitmask)
    if all(p.temperature < GREEDY_EPS for p in batch.params):
        # Greedy: p is one-hot at the processed argmax. One argmax and one read of R ints
        # instead of [R, V] probabilities and noise.
        target = sampler.greedy_tokens(logits, batch).tolist()
    elif not draft_probs:
        # Point-mass proposals (n-gram): each row's plain draw decides (module docstring).
        target = sampler.draw(logits, batch).tolist()
    else:
        tokens = _rejection_tokens(sampler, requests, ks, index, logits, batch, draft_probs)
        return tokens, _logprobs(logits, sampler.vocab_size, requests, tokens, index)
    tokens = [
        greedy_accept(req.spec_token_ids[:k], target[idx[0] : idx[0] + k + 1])
        for req, k, idx in zip(requests, ks, index, strict=True)
    ]
    return tokens, _logprobs(logits, sampler.vocab_size, requests, tokens, index)


def _row_batch(
    requests: list[Request], ks: list[int], bitmask: torch.Tensor | None
) -> tuple[SamplingBatch, list[list[int]]]:
    """The sampling inputs of every verified row, and per request its K + 1 flat row
    indices (padding past its own k repeats its last row)."""
    K = max(ks)
    batch = SamplingBatch(
        params=[], prompt_token_ids=[], output_token_ids=[], steps=[], bitmask=bitmask
    )
    index: list[list[int]] = []  # [B, K+1]
    for req, k in zip(requests, ks, strict=True):
        spec = req.spec_token_ids[:k]
        start = len(batch.params)
        for j in range(k + 1):
            batch.params.append(req.params)
            batch.prompt_token_ids.append(req.prompt_token_ids)
            batch.output_token_ids.append(req.output_token_ids + spec[:j])
            batch.steps.append(req.num_output_tokens + j)  # type: ignore[union-attr]
        index.append([start + min(j, k) for j in range(K + 1)])
    return batch, index


def _rejection_tokens(
    sampler: Sampler,
    requests: list[Request],
    ks: list[int],
    index: list[list[int]],
    logits: torch.Tensor,
    batch: SamplingBatch,
    draft_probs: Mapping[str, torch.Tensor],
) -> list[list[int]]:
    """Draft-model proposals: true rejection sampling against the draft's q. Lossless, but
    its acceptance noise is not the plain draw's, so seeded tokens are reproducible only
    for the same configuration and budget (not claimed beyond that)."""
    K = max(ks)
    probs = sampler.processed_probs(logits, batch)  # [R, V]
    noise = sampler.exponential_noise(probs, batch, salt=0)  # the plain draw's stream
    uniform = (-sampler.exponential_noise(probs[:, :1], batch, salt=ACCEPT_SALT)).exp_()  # [R, 1]
    # Host lists reach the device without a blocking copy (which would wait for the GPU
    # and leave it idle while the CPU launches the rest of the step).
    idx = _to_device(index, probs.device)  # [B, K+1]
    drafts = _to_device(
        [r.spec_token_ids[:k] + [0] * (K - k) for r, k in zip(requests, ks, strict=True)],
        probs.device,
    )
    q = torch.zeros((len(requests), K, probs.shape[1]), device=probs.device)
    for b, (req, k) in enumerate(zip(requests, ks, strict=True)):
        q[b, :k] = draft_probs[req.request_id][:k, : probs.shape[1]]
    out = rejection_sample(
        probs[idx],
        drafts,
        q,
        _to_device(ks, probs.device),
        uniform[idx[:, :K], 0],
        noise[idx],
    ).tolist()
    return [[t for t in row if t >= 0] for row in out]


def greedy_accept(proposals: list[int], target: list[int]) -> list[int]:
    """Emitted tokens when each row's token is already drawn (greedy: the argmax; n-gram:
    the plain draw): the proposals that match their row's token (target[j] verifies
    proposals[j]), then the token of the first row that did not match, or of the last row
    (the bonus token). Always len(matched) + 1 tokens."""
    n = 0
    while n < len(proposals) and proposals[n] == target[n]:
        n += 1
    return target[: n + 1]


def _logprobs(
    logits: torch.Tensor,
    vocab_size: int,
    requests: list[Request],
    tokens: list[list[int]],
    index: list[list[int]],
) -> list[list[TokenLogprobs]]:
    num_top = max(
        (r.params.logprobs for r in requests if r.params.logprobs is not None), default=None
    )
    result: list[list[TokenLogprobs]] = [[] for _ in requests]
    if num_top is None:
        return result
    chosen = [0] * logits.shape[0]
    for toks, idx in zip(tokens, index, strict=True):
        for t, i in zip(toks, idx, strict=False):
            chosen[i] = t
    lps = compute_logprobs(
        logits[:, :vocab_size], _to_device(chosen, logits.device), num_top
    ).to_lists([num_top] * len(chosen))
    for b, (req, toks) in enumerate(zip(requests, tokens, strict=True)):
        if req.params.logprobs is not None:
            k = req.params.logprobs
            result[b] = [
                TokenLogprobs(lp.token_ids[: 1 + k], lp.logprobs[: 1 + k], lp.rank)
                for lp in (lps[i] for i in index[b][: len(toks)])
            ]
    return result


def _to_device(values: list, device: torch.device) -> torch.Tensor:
    """An int64 tensor from host lists, copied without waiting for the GPU."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
