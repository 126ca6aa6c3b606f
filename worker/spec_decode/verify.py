"""The target's side of one speculative step: from the 1 + k verified rows to emitted tokens.

    request with proposals [x1 x2 x3], output so far o:
      row 0 logits -> p0 = p(. | o)            verifies x1
      row 1 logits -> p1 = p(. | o x1)         verifies x2
      row 2 logits -> p2 = p(. | o x1 x2)      verifies x3
      row 3 logits -> p3 = p(. | o x1 x2 x3)   the bonus token if all are accepted

Row j is processed as the plain sampler would process a request whose output is o plus
the first j proposals (grammar mask, penalties, min_tokens), and its randomness is keyed by output
position len(o) + j, so seeded requests stay reproducible.
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
    K = max(ks)
    logits = model.compute_logits(take_rows(hidden, [i for r in rows for i in r]))  # [R, V]
    batch = SamplingBatch(
        params=[], prompt_token_ids=[], output_token_ids=[], steps=[], bitmask=bitmask
    )
    index: list[list[int]] = []  # [B, K+1] flat row of (request, position); padding repeats
    for req, k in zip(requests, ks, strict=True):
        spec = req.spec_token_ids[:k]
        start = len(batch.params)
        for j in range(k + 1):
            batch.params.append(req.params)
            batch.prompt_token_ids.append(req.prompt_token_ids)
            batch.output_token_ids.append(req.output_token_ids + spec[:j])
            batch.steps.append(req.num_output_tokens + j)  # type: ignore[union-attr]
        index.append([start + min(j, k) for j in range(K + 1)])
    if all(p.temperature < GREEDY_EPS for p in batch.params):
        # Greedy: p is one-hot at the processed argmax, so rejection sampling reduces to
        # "accept while the proposal is the argmax, then emit the argmax" (greedy_accept).
        # One argmax and one read of R ints instead of [R, V] probabilities and noise.
        target = sampler.greedy_tokens(logits, batch).tolist()
        tokens = [
            greedy_accept(req.spec_token_ids[:k], target[idx[0] : idx[0] + k + 1])
            for req, k, idx in zip(requests, ks, index, strict=True)
        ]
        return tokens, _logprobs(logits, sampler.vocab_size, requests, tokens, index)
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
    q = None
    if draft_probs:
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
    tokens = [[t for t in row if t >= 0] for row in out]
    return tokens, _logprobs(logits, sampler.vocab_size, requests, tokens, index)


def greedy_accept(proposals: list[int], target: list[int]) -> list[int]:
    """Emitted tokens under greedy: the proposals that match the target's argmax at their
    row (target[j] verifies proposals[j]), then the argmax of the first row that did not
    match, or of the last row (the bonus token). Always len(matched) + 1 tokens."""
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
