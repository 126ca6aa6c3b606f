"""Copying checkpoint tensors into a model, whatever the family's names and fusions.

Each model lists every tensor it expects as {checkpoint name: Target}: which parameter it
goes to, where inside it (a row slice of a fused projection, an expert of a stacked
expert tensor), and, for fused q/k/v checkpoints laid out per head, how its rows reorder
into our q | k | v layout. `load_checkpoint` streams the tensors one at a time, and names
what is unexpected, misshapen or missing in checkpoint terms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

Index = tuple[int | slice, ...]


@dataclass(frozen=True)
class Target:
    param: str  # our parameter name, e.g. "layers.3.self_attn.qkv_proj.weight"
    index: Index = ()  # where in the parameter the tensor goes: param.data[index]
    rows: torch.Tensor | None = None  # reorder the checkpoint's rows: ours = tensor[rows]


def load_checkpoint(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    source: str,
    targets: dict[str, Target],
    skip: Callable[[str], bool],
) -> None:
    """Copy each (name, tensor) into place; raise ValueError naming the file and tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for name, tensor in weights:
        if skip(name):
            continue
        target = targets.get(name)
        param = params.get(target.param) if target is not None else None
        if target is None or param is None:
            raise ValueError(f"{source}: unexpected tensor {name!r} in checkpoint")
        dst = param.data[target.index] if target.index else param.data
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(dst.shape)}"
            )
        dst.copy_(tensor if target.rows is None else tensor[target.rows])
        loaded.add(name)
    missing = [name for name in targets if name not in loaded]
    if missing:
        shown = ", ".join(missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{source}: checkpoint is missing tensors: {shown}{more}")


def qkv_rows(layout: str, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor | None:
    """Indices that reorder a fused query_key_value's rows into [q heads | k heads | v heads]
    (None: already in that order). Our row r takes the checkpoint's row rows[r].

    per_head      [H, 3, D]           GPT-NeoX, Falcon without multi-query
    per_kv_group  [Hkv, group + 2, D] Falcon's new decoder architecture: a KV group's query
                                      heads, then its key head, then its value head
    """
    if layout in ("separate", "q_k_v"):
        return None
    d = torch.arange(head_dim)
    if layout == "per_head":
        h = torch.arange(num_heads)
        heads = [(h * 3 + i)[:, None] * head_dim + d for i in range(3)]  # [H, D] each
        return torch.cat([x.flatten() for x in heads])
    if layout == "per_kv_group":
        group = num_heads // num_kv_heads
        h = torch.arange(num_heads)
        q = ((h // group) * (group + 2) + h % group)[:, None] * head_dim + d
        g = torch.arange(num_kv_heads) * (group + 2)
        k = (g + group)[:, None] * head_dim + d
        v = (g + group + 1)[:, None] * head_dim + d
        return torch.cat([q.flatten(), k.flatten(), v.flatten()])
    raise ValueError(f"unknown qkv layout {layout!r}")


def weight_and_bias(src: str, dst: str, bias: bool, rows: torch.Tensor | None = None) -> dict:
    """{src.weight: dst.weight, src.bias: dst.bias (if bias)} with an optional row order."""
    out = {f"{src}.weight": Target(f"{dst}.weight", rows=rows)}
    if bias:
        out[f"{src}.bias"] = Target(f"{dst}.bias", rows=rows)
    return out
