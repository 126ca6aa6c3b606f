"""Freeing an engine's device memory on purpose (EngineCore.shutdown), not when the last
reference to it happens to go.

A caller may still hold the engine, its runner or its model (a benchmark's local, an
exception's traceback, a test): dropping our own references is then not enough. So the
model's tensors are swapped for meta tensors of the same shapes, which hold no memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

META = torch.device("meta")
OUR_PACKAGES = ("worker.", "cuda.")  # helper objects of ours that modules hold


def release_model(model: nn.Module) -> None:
    """Move every tensor the model holds to the meta device: parameters and buffers, plain
    tensor attributes of its modules (rotary tables, packed weights), and those of our own
    helper objects the modules hold (the attention backend's decode workspace). The model
    cannot run afterwards; its structure (and so its shapes) stays readable."""
    model.to(META)
    seen: set[int] = set()
    for module in model.modules():
        for value in _metafy(module):
            kind = type(value)
            if kind.__module__.startswith(OUR_PACKAGES) and id(value) not in seen:
                seen.add(id(value))
                _metafy(value)


def _metafy(obj: Any) -> list[Any]:
    """Swap obj's tensor attributes for meta ones; returns its other attribute values."""
    others = []
    for name, value in list(vars(obj).items()):
        if isinstance(value, torch.Tensor):
            if value.device != META:
                object.__setattr__(obj, name, value.to(META))
        elif not isinstance(value, nn.Module) and hasattr(value, "__dict__"):
            others.append(value)
    return others
