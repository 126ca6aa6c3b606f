"""A model's own sampling defaults, from its generation_config.json, as vLLM applies them
(`--generation-config auto`): a request field left unset takes the model's value; a field
the request sets wins. `--generation-config vllm` ignores the file. GGUF files carry none.

Pure Python: the fake engine and the real one both read it; the gateway receives the
result in ModelInfo.sampling_defaults.
"""

from __future__ import annotations

import json
import os
from typing import Any

GENERATION_CONFIG_MODES = ("auto", "vllm")

# generation_config.json key -> request field
KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def sampling_defaults(generation_config: dict[str, Any], mode: str = "auto") -> dict[str, float]:
    """The request defaults a generation_config.json sets (numbers only; others ignored)."""
    if mode not in GENERATION_CONFIG_MODES:
        raise ValueError(
            f"generation_config must be one of {', '.join(GENERATION_CONFIG_MODES)}, got {mode!r}"
        )
    if mode == "vllm":
        return {}
    out: dict[str, float] = {}
    for key, field in KEYS.items():
        value = generation_config.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[field] = value
    return out


def read_generation_config(folder: str) -> dict[str, Any]:
    """generation_config.json of a model folder, {} when absent or not a folder."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}
