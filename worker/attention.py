"""Attention metadata for one flat token batch, and the backends that consume it.

The metadata is built once per step by the model runner and passed down explicitly to
every layer (never through a global). A backend writes the step's K/V into the paged cache
and computes attention over it; the torch backend (CPU) runs torch's SDPA on each request's
gathered K/V (worker/cpu_attention.py), the CUDA backend our kernels.
The KV cache is 16/32-bit (the model's dtype) or float8_e4m3fn (`--kv-cache-dtype fp8`),
written with per-layer scales k_scale / v_scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cuda.kv_write import write_kv_ref
from worker.cpu_attention import paged_attention_sdpa


@dataclass
class QueryCapture:
    """KV compression's observation windows: each layer's rotated queries of some rows."""

    rows: torch.Tensor  # [R] int64: rows of the flat batch to keep
    layers: list[torch.Tensor] = field(default_factory=list)  # per layer, [R, Hq, D]


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] int32: request r's tokens are rows qsl[r]:qsl[r+1]
    seq_lens: torch.Tensor  # [B] int32: cached length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each token; -1 = padding
    max_query_len: int  # upper bound on q_len (host int; fixed in a CUDA graph)
    max_seq_len: int  # upper bound on seq_len (host int; fixed in a CUDA graph)
    # KV compression (worker/kv_compression.py): queries to keep, and PyramidKV's per-layer
    # lengths and slots ([L, B] / [L, T]) when layers hold different numbers of tokens.
    capture: QueryCapture | None = None
    layer_seq_lens: torch.Tensor | None = None
    layer_slot_mapping: torch.Tensor | None = None

    def for_layer(self, index: int) -> AttentionMetadata:
        """The metadata layer `index` reads: itself unless layers differ in length."""
        if self.layer_seq_lens is None or self.layer_slot_mapping is None:
            return self
        if index < 0:
            raise RuntimeError("per-layer KV lengths need numbered layers (number_layers)")
        return dataclasses.replace(
            self,
            seq_lens=self.layer_seq_lens[index],
            slot_mapping=self.layer_slot_mapping[index],
            layer_seq_lens=None,
            layer_slot_mapping=None,
        )


class AttentionBackend(Protocol):
    def __call__(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        md: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        k_scale: float = 1.0,  # FP8 KV cache: the cache holds K / k_scale
        v_scale: float = 1.0,
    ) -> torch.Tensor: ...  # [T, Hq, D]


class TorchAttention:
    """What runs on CPU: the reference K/V write, then SDPA per request (linear memory in the
    context length, unlike the einsum reference the CUDA kernels are tested against)."""

    name = "torch"

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        write_kv_ref(k, v, kv_cache, md.slot_mapping, k_scale, v_scale)
        return paged_attention_sdpa(
            q,
            kv_cache,
            md.query_start_loc,
            md.seq_lens,
            md.block_tables,
            scale,
            sliding_window,
            k_scale=k_scale,
            v_scale=v_scale,
        )
