"""Freeing an engine's device memory on purpose (EngineCore.shutdown), not when the last
reference to it happens to go.

A caller may still hold the engine, its runner or its model (a benchmark's local, an
exception's traceback, a test): dropping our own references is then not enough. So the
model's tensors are swapped for meta tensors of the same shapes, which hold no memory.
"""

from __future__ import annotations

import torch
from torch import nn

META = torch.device("meta")


def release_model(model: nn.Module) -> None:
    """Move every tensor the model holds to the meta device: parameters and buffers, and
    plain tensor attributes of its modules (rotary tables, packed weights). The model
    cannot run afterwards; its structure (and so its shapes) stays readable."""
    model.to(META)
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.device != META:
                setattr(module, name, value.to(META))
