"""Quantized checkpoint folders written from the formats' definitions, for the format tests
(tests/test_fp8_formats.py, tests/test_int4_checkpoint_formats.py).

Nothing here imports the loaders' code: FP8 weights are quantized with the definition
(scale = amax / 448, q = float8_e4m3fn(w / scale)); 4-bit ones are packed by
tests/int4_checkpoints.py (also written from the definitions). Folders may be split into
safetensors shards with a model.safetensors.index.json, tensors of one module spread
over different shards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def fp8_quantize(w: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], fp32 scale: [N, 1] per row or [] per tensor)."""
    wf = w.float()
    amax = wf.abs().amax(dim=1, keepdim=True) if per_row else wf.abs().amax()
    scale = (amax / E4M3_MAX).clamp(min=1e-12)
    return (wf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def save_folder(
    src: Path,
    dest: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    shards: int = 1,
    side_files: dict[str, Any] | None = None,
) -> Path:
    """A model folder: src's tokenizer files, `config` as config.json, `tensors` in one
    model.safetensors or in `shards` files with an index (sorted names dealt round-robin,
    so a module's weight and scales, or qweight / qzeros / scales, land in different
    shards); side_files: more JSON files (e.g. quantize_config.json)."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        skip = f.suffix == ".safetensors" or f.name.endswith(".index.json")
        skip = skip or f.name in ("config.json", "quantize_config.json", "quant_config.json")
        if f.is_file() and not skip:
            (dest / f.name).write_bytes(f.read_bytes())
    (dest / "config.json").write_text(json.dumps(config))
    for name, content in (side_files or {}).items():
        (dest / name).write_text(json.dumps(content))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(dest / "model.safetensors"))
        return dest
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(dest / file))
        weight_map |= {n: file for n in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


def model_logits(path: Path, tokens: list[int], **engine_args: Any) -> torch.Tensor:
    """Logits [T, V] of one sequence through headrace's engine on CPU (prefill, then
    decode steps that read the paged KV cache)."""
    from tests.fp8_checkpoints import model_logits as run

    return run(path, tokens, **engine_args)


def engine(path: Path, **kwargs: Any) -> Any:
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    return EngineCore(EngineConfig(model=str(path), num_gpu_blocks=16, device="cpu", **kwargs))
