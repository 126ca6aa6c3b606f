"""A model's weights, streamed one tensor at a time (the folder itself: ipc/model_folder.py).

safetensors files are read through `safetensors.safe_open` (memory-mapped), so a checkpoint
is never held in RAM twice; GGUF tensors are dequantized one by one (worker/gguf_weights.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

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
    from safetensors import safe_open

    for file in files.weight_files:
        try:
            f = safe_open(file, framework="pt", device="cpu")
            names = list(f.keys())
        except Exception as e:  # SafetensorError derives from Exception only
            raise ModelLoadError(f"{file}: cannot read safetensors file: {e}") from e
        for name in names:
            yield name, f.get_tensor(name)
        del f  # unmaps the file before the next one is opened
