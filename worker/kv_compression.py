"""KV cache compression: what each layer keeps of a long prompt, and where (no torch).

When a request's prefill completes, SnapKV scores every cached position of every layer and
KV head by the attention the prompt's last W queries (the observation window) pay it, and
keeps the top scorers plus the window; the rest of the request's blocks go back to the pool
(worker/kv_compaction.py does the device work, KVCacheManager.compact the bookkeeping).
PyramidKV keeps more in the lower layers and less in the upper ones (same mean); the
StreamingLLM baseline keeps the first NUM_SINKS tokens and the most recent ones.

    before   cache index = position     [p0 p1 p2 ... p(S-1)]   S cached tokens
    after    layer l, KV head h:        [its kept_l positions, in order | window]
             the next token (position S) lives at index S - kv_offset, kv_offset = S - K,
             K = max_l kept_l; on a PyramidKV layer at index S - kv_offset - shift_l,
             shift_l = K - kept_l (one block table for all layers, sized for K)

Rotary is applied before K is cached, so a moved key keeps its true position; new tokens
keep theirs too (positions go on from S while cache indices go on from K). A compacted
table is never entered in the prefix cache: its content depends on the window's queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ipc.messages import KVCompression, SamplingParams, check_kv_budget
from worker.config import EngineConfig
from worker.model_config import ModelConfig

POOL_KERNEL = 7  # SnapKV's 1-D pooling of the window's votes (clusters neighbours)
NUM_SINKS = 4  # StreamingLLM: the first tokens every later query leans on
PYRAMID_BETA = 20  # PyramidKV: the top layer keeps 1/beta of the mean (its default)


@dataclass(frozen=True)
class KVCompressionSettings:
    """One request's compression, resolved from the worker's flags and the request."""

    method: str  # snapkv, pyramidkv or streaming
    budget: float  # ratio in (0, 1) of the cached prompt, or tokens kept per layer
    window: int  # observation window (SnapKV, PyramidKV): always kept
    min_prompt_len: int  # shorter prompts are left alone

    @property
    def scores(self) -> bool:
        """Does the method read the window's queries (StreamingLLM's does not)?"""
        return self.method != "streaming"

    def will_score(self, cached_len: int) -> bool:
        """Will a prefill ending at `cached_len` read its window's queries?"""
        return self.scores and self.total(cached_len) is not None

    def total(self, cached_len: int) -> int | None:
        """Tokens kept per layer (the mean, for PyramidKV) of `cached_len`; None: keep all."""
        if cached_len < self.min_prompt_len:
            return None
        kept = int(self.budget) if self.budget >= 1 else math.ceil(self.budget * cached_len)
        kept = max(kept, self.window + 1, NUM_SINKS + 1)
        return kept if kept < cached_len else None

    def kept_per_layer(self, cached_len: int, num_layers: int) -> list[int] | None:
        total = self.total(cached_len)
        if total is None:
            return None
        if self.method != "pyramidkv" or num_layers == 1:
            return [total] * num_layers
        return pyramid_budgets(
            total - self.window, cached_len - self.window, num_layers, self.window
        )


def pyramid_budgets(mean: int, most: int, num_layers: int, window: int) -> list[int]:
    """PyramidKV's arithmetic schedule: layer 0 keeps the most, the last layer the least,
    averaging `mean` selected tokens (capped at `most`, all there are), plus the window."""
    low = mean // PYRAMID_BETA
    high = 2 * mean - low
    if high > most:
        high = most
        low = 2 * mean - high
    step = (high - low) / (num_layers - 1)
    return [round(high - i * step) + window for i in range(num_layers)]


def resolve_settings(
    config: EngineConfig, asked: KVCompression | None
) -> KVCompressionSettings | None:
    """The request's compression: its own `kv_compression` over the worker's flags.

    ValueError (naming the field) when the combination is invalid, e.g. a token budget not
    larger than the window the flags give.
    """
    method = config.kv_compression if asked is None else asked.method
    if method is None or method == "none":
        return None
    budget = asked.budget if asked is not None and asked.budget else config.kv_compression_budget
    window = asked.window if asked is not None and asked.window else config.kv_compression_window
    field = (
        "kv_compression.budget" if asked is not None and asked.budget else "kv_compression_budget"
    )
    check_kv_budget(budget, window, field)
    return KVCompressionSettings(method, budget, window, config.kv_compression_min_prompt_len)


def kv_compression_for(
    config: EngineConfig, model: ModelConfig, params: SamplingParams
) -> KVCompressionSettings | None:
    """A new request's settings; ValueError when the request or model cannot compress."""
    settings = resolve_settings(config, params.kv_compression)
    if settings is not None and model.sliding_window is not None:
        # A sliding window masks by cache index, which compaction decouples from position.
        raise ValueError(
            f"kv_compression: models with sliding-window attention are not supported "
            f"(this model's sliding_window is {model.sliding_window})"
        )
    if settings is not None and config.tensor_parallel_size > 1:
        # Compaction moves the leader's KV blocks only; the followers' shards would diverge.
        raise ValueError(
            "kv_compression is not supported with tensor parallel "
            f"(tensor_parallel_size={config.tensor_parallel_size})"
        )
    return settings


def window_positions(
    settings: KVCompressionSettings, num_tokens: int, start: int, end: int
) -> range:
    """Positions of this step (start..end-1) whose queries the compression will read: the
    last `window` of the `num_tokens` a prefill ends at, if the request will compress."""
    if not settings.will_score(num_tokens):
        return range(0)
    lo = max(start, num_tokens - settings.window)
    return range(lo, max(lo, min(end, num_tokens)))


def layer_inputs(
    reqs: Sequence[tuple[int, int, int, Sequence[int], Sequence[int] | None]],
    slot_mapping: np.ndarray,
    seq_lens: np.ndarray,
    num_layers: int,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer seq_lens [L, B] and slot_mapping [L, T] for a step with PyramidKV requests.

    `reqs[b]` = (first row, rows, cache index of the first row, block table, layer shifts
    or None); a layer's rows sit `shift_l` indices lower than the step's shared ones.
    """
    layer_seq = np.repeat(seq_lens[None, :], num_layers, axis=0)
    layer_slots = np.repeat(slot_mapping[None, :], num_layers, axis=0)
    for b, (row0, n, first, table, shift) in enumerate(reqs):
        if shift is None:
            continue
        sh = np.asarray(shift, dtype=np.int64)[:, None]  # [L, 1]
        index = first + np.arange(n, dtype=np.int64)[None, :] - sh  # [L, n]
        blocks = np.asarray(table, dtype=np.int64)[index // block_size]
        layer_slots[:, row0 : row0 + n] = blocks * block_size + index % block_size
        layer_seq[:, b] -= sh[:, 0].astype(np.int32)
    return layer_seq, layer_slots
