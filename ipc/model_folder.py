"""Finding and reading a model folder: config, generation config, tokenizer path, weight files.

A model is one of:
- a Hugging Face folder: `config.json`, `model.safetensors` or shards listed in
  `model.safetensors.index.json` (or any `*.safetensors`), tokenizer files beside them;
- a `.gguf` file, or a folder holding exactly one (see ipc/gguf_metadata.py).

No torch here: the gateway finds tokenizer paths through this module, the worker the config
and weight files; reading the weights is the worker's (worker/weights.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


class ModelLoadError(ValueError):
    """A model path that cannot be loaded; the message names the file and the problem."""


@dataclass
class ModelFiles:
    """One model's files, resolved (worker.weights.iter_weights streams its tensors)."""

    path: str  # the folder or .gguf file, as resolved
    format: str  # "safetensors" or "gguf"
    config: dict[str, Any]  # Hugging Face config.json-like dict (built from metadata for GGUF)
    generation_config: dict[str, Any]  # generation_config.json, {} if absent
    tokenizer_path: str  # what gateway.tokenizer.load_tokenizer takes
    weight_files: list[str] = field(default_factory=list)  # safetensors files, in order
    dummy: bool = False  # load_format "dummy": no weights are read


def open_model(path: str, load_format: str = "auto") -> ModelFiles:
    """Resolve `path` (folder or .gguf file) and read its config; weights are read lazily."""
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(
            f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}"
        )
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise ModelLoadError(f"{path} not found")
    gguf_path = find_gguf_file(path)
    # A folder with config.json is a Hugging Face folder even if it also ships a .gguf.
    is_hf_folder = os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))
    if gguf_path is not None and (load_format == "gguf" or not is_hf_folder):
        if load_format == "safetensors":
            raise ModelLoadError(f"{gguf_path}: load_format 'safetensors' but this is a GGUF file")
        return _open_gguf(gguf_path, dummy=load_format == "dummy")
    if load_format == "gguf":
        raise ModelLoadError(f"{path}: load_format 'gguf' but no .gguf file found")
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: not a folder or a .gguf file")
    return _open_hf_folder(path, dummy=load_format == "dummy")


def find_gguf_file(path: str) -> str | None:
    """`path` itself if it is a .gguf file, the only .gguf in folder `path`, else None."""
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if not os.path.isdir(path):
        return None
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(ggufs) > 1 and not os.path.exists(os.path.join(path, "config.json")):
        raise ModelLoadError(
            f"{path}: holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); pass one file's path"
        )
    return os.path.join(path, ggufs[0]) if len(ggufs) == 1 else None


def read_json(path: str, required: bool = True) -> dict[str, Any]:
    """A JSON object from `path`; {} when absent and not required. Errors name the file."""
    if not os.path.exists(path):
        if required:
            raise ModelLoadError(f"{path} not found")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _open_gguf(gguf_path: str, dummy: bool) -> ModelFiles:
    from ipc.gguf_metadata import gguf_config

    return ModelFiles(
        path=gguf_path,
        format="gguf",
        config=gguf_config(gguf_path),
        generation_config={},
        tokenizer_path=gguf_path,
        dummy=dummy,
    )


def _open_hf_folder(path: str, dummy: bool) -> ModelFiles:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise ModelLoadError(f"{config_path} not found: not a model folder")
    config = read_json(config_path)
    generation_config = read_json(os.path.join(path, "generation_config.json"), required=False)
    weight_files: list[str] = []
    if not dummy:
        weight_files = _safetensors_files(path)
        if not weight_files:
            if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
                raise ModelLoadError(
                    f"{path}: holds only PyTorch .bin/.pt weights; only safetensors and GGUF "
                    "checkpoints are supported (convert with safetensors' convert script)"
                )
            raise ModelLoadError(f"{path}: no *.safetensors weights found")
    return ModelFiles(
        path=path,
        format="safetensors",
        config=config,
        generation_config=generation_config,
        tokenizer_path=path,
        weight_files=weight_files,
        dummy=dummy,
    )


def _safetensors_files(path: str) -> list[str]:
    """The checkpoint's safetensors files: the index's shards, model.safetensors, or all."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_path}: no 'weight_map' object")
        shards = sorted(set(weight_map.values()))
        files = [os.path.join(path, s) for s in shards]
        for f in files:
            if not os.path.exists(f):
                raise ModelLoadError(f"{f} not found (listed in {index_path})")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
