"""Sparse mixture-of-experts MLP (Mixtral): each token runs k of E gated-SiLU experts.

Routing, as transformers computes it::

    logits = x @ gate^T                        [T, E]  (model dtype)
    probs  = softmax(logits in fp32)           [T, E]
    w, e   = topk(probs, k)                    [T, k]  weights and expert ids
    w      = w / w.sum(-1)                     renormalized over the chosen k
           = softmax(the k chosen logits)      (how `route` computes it)
    out    = sum_j w[:, j] * expert_{e[:, j]}(x)

Experts are stacked: w_gate_up [E, 2I, H] (gate | up rows), w_down [E, H, I].

Two implementations of the expert sum, same math:
- `experts_ref`: a loop over experts, each gathering its tokens with index_select and
  adding its output back with index_add (data-dependent shapes: CPU, and eager GPU steps
  whose shapes torch._grouped_mm does not take);
- `experts_grouped`: the T*k (token, expert) pairs sorted by expert, so each expert runs
  one GEMM per step through torch._grouped_mm with device-side group offsets. Every shape
  is fixed by T and k, and the sort is a counting sort (one-hot cumsum), so nothing reads
  a length on the host: a decode step runs inside a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cuda.fused_ops import silu_and_mul
from worker.model_config import ModelConfig
from worker.models.layers import no_reduce


def route(
    logits: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:  # [T, E] -> weights [T, k] fp32, ids [T, k] int64
    """transformers' routing in two kernels instead of five: the top k of softmax(logits)
    are the top k logits (softmax keeps order), and the softmax renormalized over them is
    the softmax of those k logits alone (the other terms of its sum cancel)."""
    top, ids = torch.topk(logits, k, dim=-1)
    return torch.softmax(top, dim=-1, dtype=torch.float32), ids


def experts_ref(
    x: torch.Tensor,  # [T, H]
    weights: torch.Tensor,  # [T, k] fp32
    ids: torch.Tensor,  # [T, k]
    w_gate_up: torch.Tensor,  # [E, 2I, H]
    w_down: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:  # [T, H]
    out = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        tok, slot = torch.where(ids == e)  # the pairs routed to expert e
        if tok.numel() == 0:
            continue
        xe = x.index_select(0, tok)  # [n, H]
        h = silu_and_mul(F.linear(xe, w_gate_up[e]))  # [n, I]
        y = F.linear(h, w_down[e]) * weights[tok, slot, None]  # [n, H] fp32
        out.index_add_(0, tok, y.to(x.dtype))
    return out


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dest [T*k]: the sorted row of each (token, slot) pair; group ends [E] int32).

    A stable counting sort on the device: pair p goes after every pair of a smaller
    expert and after the earlier pairs of its own expert. Nine small kernels, none of
    which reads a count on the host (a decode step stays capturable)::

        running[p, e] = pairs <= p routed to e      (one-hot, cumsum over pairs)
        counts = running[-1]; ends = cumsum(counts)
        dest[p] = ends[e_p] - counts[e_p] + running[p, e_p] - 1
    """
    flat = ids.flatten()  # [P], P = T*k
    experts = torch.arange(num_experts, device=ids.device)
    running = (flat[:, None] == experts).cumsum(0)  # [P, E] int64 (F.one_hot would sync)
    counts = running[-1]  # [E]
    ends = counts.cumsum(0, dtype=torch.int32)  # [E]
    rank = running.gather(1, flat[:, None]).squeeze(1) - 1  # [P] within its expert
    return (ends - counts)[flat] + rank, ends


def experts_grouped(
    x: torch.Tensor,  # [T, H]
    weights: torch.Tensor,  # [T, k] fp32
    ids: torch.Tensor,  # [T, k]
    w_gate_up: torch.Tensor,  # [E, 2I, H]
    w_down: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:  # [T, H]
    T, k = ids.shape
    dest, ends = sort_by_expert(ids, w_gate_up.shape[0])
    src_token = torch.empty_like(dest)
    src_token[dest] = torch.arange(T * k, device=x.device) // k  # sorted row -> token
    xs = x.index_select(0, src_token)  # [P, H], grouped by expert
    h = silu_and_mul(torch._grouped_mm(xs, w_gate_up.transpose(1, 2), offs=ends))  # [P, I]
    ys = torch._grouped_mm(h, w_down.transpose(1, 2), offs=ends)  # [P, H]
    y = ys.index_select(0, dest).view(T, k, -1)  # back to (token, slot) order
    return (y * weights[..., None]).sum(1).to(x.dtype)


def grouped_supported(x: torch.Tensor, w_gate_up: torch.Tensor) -> bool:
    """torch._grouped_mm on CUDA: bf16, 16-byte aligned rows, compute capability >= 9.0."""
    if not x.is_cuda or x.dtype != torch.bfloat16 or w_gate_up.dtype != torch.bfloat16:
        return False
    hidden, inter = x.shape[1], w_gate_up.shape[1] // 2
    if hidden % 8 or inter % 8:
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(h, e, bias=False)  # the router
        self.w_gate_up = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w_down = nn.Parameter(torch.empty(e, h, i))
        # Tensor parallel: every rank holds I/N rows of each expert (w_down: its columns)
        # and routes the same; this sums the ranks' partial outputs (worker/parallel/).
        self.out_reduce: Callable[[torch.Tensor], torch.Tensor] = no_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        weights, ids = route(self.gate(x), self.top_k)
        run = experts_grouped if grouped_supported(x, self.w_gate_up) else experts_ref
        return self.out_reduce(run(x, weights, ids, self.w_gate_up, self.w_down))
