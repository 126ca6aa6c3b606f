"""The KV cache's element type: the model's dtype, or FP8 e4m3 (one byte per element)."""

from __future__ import annotations

import torch

from worker.quant.config import check_kv_cache_dtype


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """auto -> the model's dtype; fp8 / fp8_e4m3 -> torch.float8_e4m3fn."""
    check_kv_cache_dtype(name)
    if name == "auto":
        return model_dtype
    return torch.float8_e4m3fn
