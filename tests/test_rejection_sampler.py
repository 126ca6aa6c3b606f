"""The rejection sampler against its promise: emitted tokens are distributed as the target's.

All draws run as one batch (the batch dimension is the draw), with a fixed seed. A
deliberately biased variant (on a rejection it draws from p instead of norm(max(0, p - q)))
must fail the same test, so the test has the power to catch the usual mistake.

n-gram proposals are verified without rejection_sample: verify() takes each row's plain
draw and accepts while it equals the proposal. Its emitted tokens must follow the target
too, seeded or not; a fresh redraw after a mismatch, or one noise stream for all of a
request's rows, must fail.
"""

from __future__ import annotations

from typing import Any

import pytest
import scipy.stats as scipy_stats
import torch

import worker.spec_decode.verify as verify_module
from ipc.messages import SamplingParams
from worker.request import Request
from worker.sampler import Sampler
from worker.spec_decode.rejection import rejection_sample
from worker.spec_decode.verify import greedy_accept, verify

V, K, N = 6, 3, 200_000
P = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.07, 0.03])  # target
Q = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.25, 0.25])  # a draft that disagrees with it


def draw(sampler=rejection_sample, q: torch.Tensor | None = Q, seed: int = 0) -> torch.Tensor:
    """N independent verifications of K proposals drawn from q (point mass when q is None)."""
    g = torch.Generator().manual_seed(seed)
    target = P.expand(N, K + 1, V)
    if q is None:  # a fixed guess, as n-gram lookup makes
        drafts = torch.full((N, K), 4)
        draft_probs = None
    else:
        drafts = torch.multinomial(q, N * K, replacement=True, generator=g).view(N, K)
        draft_probs = q.expand(N, K, V)
    uniform = torch.rand((N, K), generator=g)
    noise = torch.empty((N, K + 1, V)).exponential_(generator=g)
    return sampler(target, drafts, draft_probs, torch.full((N,), K), uniform, noise)


def chi2_pvalue(tokens: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=V).double()
    expected = P.double() / P.double().sum() * counts.sum()
    return float(scipy_stats.chisquare(counts.numpy(), expected.numpy()).pvalue)


def positions_pvalues(out: torch.Tensor) -> list[float]:
    """p-value of the emitted tokens at each position (where a token was emitted) against P."""
    return [
        chi2_pvalue(out[:, j][out[:, j] >= 0])
        for j in range(K + 1)
        if (out[:, j] >= 0).sum() > 1000
    ]


def biased_rejection_sample(target, drafts, draft_probs, num_draft, uniform, noise):
    """The classic bug: after a rejection, sample from p instead of the residual."""
    out = rejection_sample(target, drafts, draft_probs, num_draft, uniform, noise)
    n = (out >= 0).sum(dim=1) - 1  # index of the drawn token
    rows = torch.arange(out.shape[0])
    redraw = (target[rows, n] / noise[rows, n]).argmax(dim=1)
    rejected = n < num_draft
    out[rows[rejected], n[rejected]] = redraw[rejected]
    return out


def test_emitted_tokens_follow_the_target_distribution():
    out = draw()
    pvalues = positions_pvalues(out)
    assert len(pvalues) == K + 1
    assert min(pvalues) > 1e-3, pvalues
    # Acceptance rate of each proposal is sum(min(p, q)).
    rate = float(torch.minimum(P, Q).sum())
    accepted_first = float((out[:, 1] >= 0).double().mean())
    assert accepted_first == pytest.approx(rate, abs=0.01)


def test_a_biased_sampler_fails_the_same_test():
    pvalues = positions_pvalues(draw(biased_rejection_sample))
    # The bonus position (all K accepted, no rejection involved) is unaffected by the bug.
    assert max(pvalues[:K]) < 1e-6, pvalues


def test_point_mass_draft_is_lossless():
    """n-gram proposals: q(x) = 1 at the proposal; accepted with probability p(x)."""
    out = draw(q=None)
    assert min(positions_pvalues(out)) > 1e-3
    assert float((out[:, 1] >= 0).double().mean()) == pytest.approx(float(P[4]), abs=0.005)


def test_draft_equal_to_target_accepts_everything():
    g = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(P, 100 * K, replacement=True, generator=g).view(100, K)
    out = rejection_sample(
        P.expand(100, K + 1, V),
        drafts,
        P.expand(100, K, V),
        torch.full((100,), K),
        torch.rand((100, K), generator=g),
        torch.empty((100, K + 1, V)).exponential_(generator=g),
    )
    assert (out[:, :K] == drafts).all() and (out[:, K] >= 0).all()


def test_greedy_accepts_while_the_proposal_is_the_argmax():
    # Target argmax per row: 2, 0, 5, 1; proposals match the first two only.
    argmax = torch.tensor([[2, 0, 5, 1]])
    target = torch.zeros(1, 4, V).scatter_(2, argmax.unsqueeze(2), 1.0)
    drafts = torch.tensor([[2, 0, 4]])
    for draft_probs in (None, torch.full((1, 3, V), 1.0 / V)):
        out = rejection_sample(
            target, drafts, draft_probs, torch.tensor([3]), torch.rand(1, 3), torch.ones(1, 4, V)
        )
        assert out.tolist() == [[2, 0, 5, -1]]
    # All accepted: the bonus token is the last row's argmax.
    out = rejection_sample(
        target,
        torch.tensor([[2, 0, 5]]),
        None,
        torch.tensor([3]),
        torch.rand(1, 3),
        torch.ones(1, 4, V),
    )
    assert out.tolist() == [[2, 0, 5, 1]]


def test_requests_with_fewer_proposals_than_the_batch_maximum():
    argmax = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    target = torch.zeros(2, 4, V).scatter_(2, argmax.unsqueeze(2), 1.0)
    drafts = torch.tensor([[1, 2, 3], [1, 0, 0]])  # row 1 has one proposal, then padding
    out = rejection_sample(
        target, drafts, None, torch.tensor([3, 1]), torch.rand(2, 3), torch.ones(2, 4, V)
    )
    assert out.tolist() == [[1, 2, 3, 4], [1, 2, -1, -1]]


def test_greedy_shortcut_matches_rejection_sampling_with_one_hot_targets():
    # verify() skips rejection_sample when every row is greedy; both must emit the same.
    g = torch.Generator().manual_seed(3)
    B, K = 200, 5
    argmax = torch.randint(0, 3, (B, K + 1), generator=g)  # small range: many matches
    target = torch.zeros(B, K + 1, V).scatter_(2, argmax.unsqueeze(2), 1.0)
    drafts = torch.randint(0, 3, (B, K), generator=g)
    num = torch.randint(1, K + 1, (B,), generator=g)
    out = rejection_sample(
        target,
        drafts,
        None,
        num,
        torch.rand((B, K), generator=g),
        torch.empty((B, K + 1, V)).exponential_(generator=g),
    ).tolist()
    lengths = set()
    for b in range(B):
        k = int(num[b])
        # Rows past a request's k repeat its last row, as verify()'s index does.
        rows = [argmax[b, min(j, k)].item() for j in range(k + 1)]
        got = greedy_accept(drafts[b, :k].tolist(), rows)
        assert got == [t for t in out[b] if t >= 0]
        lengths.add(len(got))
    assert len(lengths) >= 4  # both early rejections and full acceptance were exercised


# ---- n-gram verification: the plain draw at each row -------------------------------------

PROPOSALS = [0, 1, 0]  # likely tokens, so every position sees enough emitted tokens
N_POINT = 60_000


class TableModel:
    """compute_logits is the identity: the verified rows of `hidden` are the logits."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def point_mass_verify(seeded: bool, n: int = N_POINT) -> torch.Tensor:
    """[n, K+1] tokens emitted by verify() for n requests proposing PROPOSALS against P at
    every row (-1 past the end), each request with its own seed when seeded."""
    requests = []
    for i in range(n):
        params = SamplingParams(temperature=1.0, seed=i if seeded else None, max_tokens=16)
        req = Request(str(i), [1], params, frozenset())
        req.spec_token_ids = list(PROPOSALS)
        requests.append(req)
    rows = [list(range(i * (K + 1), (i + 1) * (K + 1))) for i in range(n)]
    logits = P.log().expand(n * (K + 1), V)
    model: Any = TableModel()
    tokens, _ = verify(model, Sampler(V, {5}), requests, rows, logits, {})
    return torch.tensor([t + [-1] * (K + 1 - len(t)) for t in tokens])


@pytest.mark.parametrize("seeded", [True, False])
def test_point_mass_verification_follows_the_target_distribution(seeded):
    out = point_mass_verify(seeded)
    pvalues = positions_pvalues(out)
    assert len(pvalues) == K + 1
    assert min(pvalues) > 1e-3, pvalues
    # Proposal j is accepted with probability p(x_j), as rejection sampling would.
    assert float((out[:, 1] >= 0).double().mean()) == pytest.approx(float(P[0]), abs=0.01)
    both = float((out[:, 2] >= 0).double().mean())
    assert both == pytest.approx(float(P[0] * P[1]), abs=0.005)


def test_point_mass_with_a_fresh_redraw_after_a_mismatch_fails():
    """The residual bug again: after a mismatch, emit a new draw from p (d included)."""
    out = point_mass_verify(seeded=True)
    n = (out >= 0).sum(dim=1) - 1  # index of the last emitted token
    rejected = n < K
    rows = torch.arange(out.shape[0])[rejected]
    g = torch.Generator().manual_seed(5)
    out[rows, n[rejected]] = torch.multinomial(P, len(rows), replacement=True, generator=g)
    assert max(positions_pvalues(out)[:K]) < 1e-6


def test_point_mass_with_one_noise_stream_per_request_fails(monkeypatch):
    """Every row of a request keyed by the same step: the draws repeat across positions."""
    row_batch = verify_module._row_batch

    def same_step(requests, ks, bitmask):
        batch, index = row_batch(requests, ks, bitmask)
        batch.steps = [0] * len(batch.params)  # every output here is empty: step 0
        return batch, index

    monkeypatch.setattr(verify_module, "_row_batch", same_step)
    assert min(positions_pvalues(point_mass_verify(seeded=True))[1:]) < 1e-6
