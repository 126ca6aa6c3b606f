"""A model's weights, streamed one tensor at a time (the folder itself: ipc/model_folder.py).

safetensors files are read through `safetensors.safe_open` (memory-mapped), so a checkpoint
is never held in RAM twice; GGUF tensors are dequantized one by one (worker/gguf_weights.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ipc.model_folder import ModelFiles, ModelLoadError

if TYPE_CHECKING:
    import torch


def iter_weights(files: ModelFiles) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face tensor name, CPU tensor), one tensor at a time."""
    if files.dummy:
        return
    if files.format == "gguf":
        from worker.gguf_weights import iter_gguf_weights

        yield from iter_gguf_weights(files.path)
        return
    for file in files.weight_files:
        f, names = open_safetensors(file)
        for name in names:
            yield name, f.get_tensor(name)


def open_safetensors(file: str) -> tuple[Any, list[str]]:
    """A memory-mapped safetensors file and its tensor names; ModelLoadError naming the file
    when it cannot be read."""
    from safetensors import safe_open

    try:
        f = safe_open(file, framework="pt", device="cpu")
        return f, list(f.keys())
    except Exception as e:  # SafetensorError derives from Exception only
        raise ModelLoadError(f"{file}: cannot read safetensors file: {e}") from e
        del f  # unmaps the file before the next one is opened
