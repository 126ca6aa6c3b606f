"""Rejection sampling for speculative decoding: lossless verification of k proposals.

Leviathan et al. 2023 / Chen et al. 2023. Given the target's distribution p at each of the
1 + k verified rows and the draft's q at the k proposal rows, the emitted tokens are
distributed exactly as k + 1 sequential draws from p would be.

verify() uses this for draft models only. A point-mass q (draft_probs None) is supported
and tested, but n-gram verification takes the equivalent, batch-independent route of
accepting while the plain draw equals the proposal (verify.py's docstring).
"""

from __future__ import annotations

import torch


def rejection_sample(
    target_probs: torch.Tensor,  # [B, K+1, V] p at each row (row i verifies proposal i)
    draft_token_ids: torch.Tensor,  # [B, K] int64 proposals x_i (padding past num_draft)
    draft_probs: torch.Tensor | None,  # [B, K, V] q, or None: q is a point mass at x_i
    num_draft: torch.Tensor,  # [B] int64: valid proposals per request, 1 <= num_draft <= K
    uniform: torch.Tensor,  # [B, K] U(0, 1): one acceptance draw per proposal
    noise: torch.Tensor,  # [B, K+1, V] Exp(1): for the one token drawn from a distribution
) -> torch.Tensor:  # [B, K+1] emitted tokens, -1 past the end: num_accepted + 1 per request
    B, K = draft_token_ids.shape
    rows = torch.arange(B, device=target_probs.device)
    pos = torch.arange(K + 1, device=target_probs.device)
    # Accept x_i with probability min(1, p(x_i) / q(x_i)), i.e. when u_i * q(x_i) < p(x_i).
    # A point-mass q (n-gram lookup) has q(x_i) = 1: accept with probability p(x_i). Greedy
    # p is one-hot at the argmax: accept exactly while the proposal is the argmax.
    p_x = target_probs[:, :K].gather(2, draft_token_ids.unsqueeze(2)).squeeze(2)  # [B, K]
    q_x = (
        1.0
        if draft_probs is None
        else draft_probs.gather(2, draft_token_ids.unsqueeze(2)).squeeze(2)
    )
    accepted = (uniform * q_x < p_x) & (pos[:K] < num_draft.unsqueeze(1))
    # The first rejection ends the run: n leading acceptances, then one drawn token at row n.
    n = accepted.long().cumprod(dim=1).sum(dim=1)  # [B]
    # After a rejection at row n the token comes from norm(max(0, p - q)): the mass p has
    # that q under-proposed. When all proposals were accepted (n == num_draft) there is no
    # q at row n, and the bonus token comes from p itself.
    p_n = target_probs[rows, n]  # [B, V]
    x_n = draft_token_ids[rows, n.clamp(max=K - 1)]  # [B]
    if draft_probs is None:
        q_n = torch.zeros_like(p_n).scatter_(1, x_n.unsqueeze(1), 1.0)
    else:
        q_n = draft_probs[rows, n.clamp(max=K - 1)]
    q_n = q_n * (n < num_draft).unsqueeze(1)
    residual = (p_n - q_n).clamp_(min=0)
    # An empty residual means p <= q everywhere, so p == q and no rejection could happen;
    # only float rounding gets here: fall back to p.
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p_n)
    # Exponential race: argmax(w / E) with E ~ Exp(1) draws from w / sum(w), unnormalized.
    last = residual.div_(noise[rows, n]).argmax(dim=1)  # [B]
    out = torch.cat([draft_token_ids, draft_token_ids[:, :1]], dim=1)  # [B, K+1]
    out = torch.where(pos < n.unsqueeze(1), out, -1)
    return out.scatter_(1, n.unsqueeze(1), last.unsqueeze(1))
