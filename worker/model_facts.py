"""Facts about a model read from its config and files, without loading weights: its end-of-
sequence ids and the bytes its weights take (for memory planning)."""

from __future__ import annotations

import torch

from ipc.model_folder import ModelFiles
from worker.model_config import ModelConfig


def eos_ids(files: ModelFiles, mc: ModelConfig) -> set[int]:
    """The config's EOS ids and generation_config.json's, which may be a list."""
    ids = set(mc.eos_token_ids)
    gen = files.generation_config.get("eos_token_id")
    if isinstance(gen, list):
        ids.update(int(t) for t in gen)
    elif gen is not None:
        ids.add(int(gen))
    return ids


def param_bytes(mc: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of a model's weights, from its shapes (for memory planning): the model built on
    the meta device, so every family's layout counts without allocating anything."""
    from worker.attention import TorchAttention
    from worker.model_loader import model_class

    with torch.device("meta"):
        model = model_class(mc)(mc, TorchAttention(), 1)
    count = sum(p.numel() for p in model.parameters())
    return count * torch.tensor([], dtype=dtype).element_size()
