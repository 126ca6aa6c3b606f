"""Attention metadata for one flat token batch, and the backends that consume it.

The metadata (`AttentionMetadata`, defined beside the kernels in cuda/paged_attention.py with
the layer constants `AttentionParams`) is built once per step by the model runner and passed
down explicitly to every layer (never through a global). A backend writes the step's K/V into the paged cache
and computes attention over it; the torch backend (CPU) runs torch's SDPA on each request's
gathered K/V (worker/cpu_attention.py), the CUDA backend our kernels.
The KV cache is 16/32-bit (the model's dtype) or float8_e4m3fn (`--kv-cache-dtype fp8`),
written with per-layer scales k_scale / v_scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from cuda.kv_write import write_kv_ref
from cuda.paged_attention import AttentionMetadata, AttentionParams, QueryCapture
from worker.cpu_attention import paged_attention_sdpa
from worker.decode_split import attend_split

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "AttentionParams",
    "PagedBackend",
    "QueryCapture",
    "TorchAttention",
]


class AttentionBackend(Protocol):
    def __call__(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        md: AttentionMetadata,
        params: AttentionParams,
    ) -> torch.Tensor: ...  # [T, Hq, D]


class PagedBackend:
    """A backend in two parts: write the step's K/V into the cache (unless the layer's fused
    rotary + KV write did it: `params.kv_written`), then attend over the cache."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        params: AttentionParams,
    ) -> torch.Tensor:
        if not params.kv_written:
            self.write_kv(k, v, kv_cache, md.slot_mapping, params.k_scale, params.v_scale)
        if md.decode_split is not None and self.splits_decodes:
            return attend_split(self.attend, q, kv_cache, md.decode_split, params)
        return self.attend(q, kv_cache, md, params)

    # Whether a mixed step's decode rows and prompt chunks attend apart (worker/decode_split.py)
    splits_decodes = False

    # (k, v, kv_cache, slot_mapping, k_scale, v_scale) -> None: the cache write
    write_kv: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float], None]

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        params: AttentionParams,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of q over the cache, into `out` when given (else a new tensor)."""
        raise NotImplementedError


class TorchAttention(PagedBackend):
    """What runs on CPU: the reference K/V write, then SDPA per request (linear memory in the
    context length, unlike the einsum reference the CUDA kernels are tested against)."""

    name = "torch"

    write_kv = staticmethod(write_kv_ref)

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        params: AttentionParams,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return paged_attention_sdpa(q, kv_cache, md, params, out)
