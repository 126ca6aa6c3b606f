"""The layers of a tensor-parallel model, and the pass that turns a model into one rank's.

A model is built as usual, on the meta device, from the rank's config (plan.rank_config:
its query heads, KV heads and MLP rows), so q/k/v and gate/up come out column-parallel by
construction: each rank's slice of output features needs no communication. `shard_model`
then makes the rest parallel:

    attention out (o_proj), MLP down   row-parallel: partial sums, `out_reduce` all-reduces
    mixture of experts (Mixtral)       each expert's I/N rows (w_down: columns); the router
                                       is replicated, so every rank routes alike
    embed_tokens                       VocabParallelEmbedding: masked lookup, all-reduce
    lm_head                            ParallelLMHead: local logits, all-gather

A row-parallel bias is added once: rank 0 loads it, the other ranks hold zeros (see
worker/parallel/loader.py), so the all-reduce sums it in exactly once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.models.base import CausalLM
from worker.models.layers import Attention, GatedMLP
from worker.models.moe import SparseMoE
from worker.parallel.plan import ShardPlan
from worker.parallel.state import TpGroup


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + per) of the (padded) embedding table."""

    def __init__(self, per_rank: int, hidden: int, start: int, group: TpGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(per_rank, hidden))
        self.start = start
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])  # another rank's row
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.group.all_reduce(x)  # each token's row came from exactly one rank


class ParallelLMHead(nn.Module):
    """Logits of rows [start, start + per) of the padded vocabulary, gathered to [N, V]."""

    def __init__(self, per_rank: int, hidden: int, vocab_size: int, group: TpGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(per_rank, hidden))
        self.vocab_size = vocab_size
        self.group = group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V]
        # Only the leader knows which rows need logits (it holds the requests): it
        # announces the call, then broadcasts the rows (the followers' hidden states are
        # the same, but not which rows of them).
        g = self.group
        if g.on_logits is not None:
            g.on_logits(hidden.shape[0])
        hidden = g.broadcast(hidden.contiguous())
        local = F.linear(hidden, self.weight)  # [N, V/size]
        return g.all_gather_cols(local)[:, : self.vocab_size]


def shard_model(model: CausalLM, plan: ShardPlan, group: TpGroup) -> None:
    """Make a model built from plan.rank_config one rank's share (on the meta device)."""
    hidden = model.config.hidden_size
    per = plan.vocab_per_rank
    model.embed_tokens = VocabParallelEmbedding(per, hidden, plan.vocab[0], group)  # type: ignore[assignment]
    model.lm_head = ParallelLMHead(per, hidden, plan.vocab_size, group)  # type: ignore[assignment]
    for module in model.modules():
        if isinstance(module, Attention | GatedMLP | SparseMoE):
            module.out_reduce = group.all_reduce
