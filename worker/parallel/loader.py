"""Reading one rank's slices of a checkpoint, without loading whole tensors.

safetensors: each tensor is opened as a slice (`safe_open(...).get_slice(name)`) and only
this rank's rows or columns are read from the memory-mapped file. GGUF tensors have to be
dequantized whole, then are sliced (GGUF models are small). The slices are yielded under
the checkpoint's own names, shaped as the rank's model expects, so the usual
`load_checkpoint` (worker/models/weights.py) copies them in and checks their shapes.

    q_proj, k_proj, v_proj, gate_proj, up_proj   rows of the rank's heads / MLP rows
      (Mixtral's experts.E.w1, w3)
    o_proj, down_proj, experts.E.w2 (weights)    the matching columns
    o_proj, down_proj (biases)                   rank 0: whole; others: zeros (summed once)
    embed_tokens, lm_head                        rows of the rank's vocabulary, zero-padded
    weight_scale (FP8, per channel)              the same rows as its weight
    the rest (norms, scales)                     whole
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ipc.model_folder import ModelFiles
from worker.parallel.plan import ShardPlan
from worker.weights import open_safetensors

REPLICATED, ROWS, COLS, RANK0 = "replicated", "rows", "cols", "rank0"


@dataclass(frozen=True)
class Shard:
    how: str  # REPLICATED, ROWS (dim 0), COLS (dim 1), RANK0 (whole on rank 0, else zeros)
    start: int = 0
    stop: int = 0
    pad_to: int = 0  # ROWS: zero rows appended up to this many (the padded vocabulary)


def shard_of(name: str, plan: ShardPlan, numel: int = 2) -> Shard:
    """How rank `plan.rank` slices the checkpoint tensor `name` (Llama-family names)."""
    d = plan.head_dim
    q = (plan.q_heads[0] * d, plan.q_heads[1] * d)
    kv = (plan.kv_heads[0] * d, plan.kv_heads[1] * d)
    module, _, kind = name.rpartition(".")
    leaf = module.rpartition(".")[2]
    if module in ("model.embed_tokens", "lm_head") and kind == "weight":
        end = min(plan.vocab[1], plan.vocab_size)
        return Shard(ROWS, plan.vocab[0], end, plan.vocab_per_rank)
    column = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": plan.inter}
    column |= {"up_proj": plan.inter, "w1": plan.inter, "w3": plan.inter}  # w1/w3: experts
    per_row = kind in ("weight", "bias") or (kind == "weight_scale" and numel > 1)
    if leaf in column and per_row:
        return Shard(ROWS, *column[leaf])
    row = {"o_proj": q, "down_proj": plan.inter, "w2": plan.inter}
    if leaf in row and kind == "weight":
        return Shard(COLS, *row[leaf])
    if leaf in row and kind == "bias":
        return Shard(RANK0)
    return Shard(REPLICATED)


def take(src: Any, shard: Shard, rank: int) -> torch.Tensor:
    """This rank's part of `src`: a safetensors slice (read lazily) for ROWS and COLS, else
    the whole tensor."""
    if shard.how == ROWS:
        t = src[shard.start : shard.stop]
        if shard.pad_to > t.shape[0]:
            pad = torch.zeros((shard.pad_to - t.shape[0], *t.shape[1:]), dtype=t.dtype)
            t = torch.cat([t, pad])
        return t
    if shard.how == COLS:
        return src[:, shard.start : shard.stop]
    t = src
    return torch.zeros_like(t) if shard.how == RANK0 and rank != 0 else t


def iter_shard_weights(files: ModelFiles, plan: ShardPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, this rank's slice), one tensor at a time."""
    if files.dummy:
        return
    if files.format == "gguf":
        from worker.gguf_weights import iter_gguf_weights

        for name, tensor in iter_gguf_weights(files.path):
            shard = shard_of(name, plan, tensor.numel())
            part = take(tensor, shard, plan.rank)
            # A slice is a view: copy it, so the whole dequantized tensor can be freed.
            yield name, part.clone() if shard.how in (ROWS, COLS) else part
        return
    for file in files.weight_files:
        f, names = open_safetensors(file)
        for name in names:
            sl = f.get_slice(name)
            numel = 1
            for n in sl.get_shape():
                numel *= n
            shard = shard_of(name, plan, numel)
            # Whole tensors (norms, scalar scales) are read as they are; slices lazily.
            src = sl if shard.how in (ROWS, COLS) else f.get_tensor(name)
            yield name, take(src, shard, plan.rank)
        del f  # unmaps the file before the next one is opened
