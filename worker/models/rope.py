"""Rotary frequencies with rope scaling: what the cos/sin table of layers.RotaryEmbedding
is built from.

Each scaling type follows transformers' modeling_rope_utils, except "dynamic", which
follows vLLM: transformers grows the base with the current sequence length past
max_position_embeddings (the rotation of a position then depends on how long the sequence
is, which a KV cache cannot honour), vLLM fixes the base once for the longest context
(max_position_embeddings x factor). model_config._rope checks the types and fields first.

    linear   positions / factor (inv_freq / factor)
    dynamic  NTK-aware base: theta * (factor^2 - factor + 1)^(R / (R - 2))
    llama3   Llama 3.1: low frequencies / factor, high ones kept, a smooth blend between
    yarn     blend of interpolated and original frequencies over a ramp of dims, and cos/sin
             scaled by the attention factor (so q.k by its square)
"""

from __future__ import annotations

import math
from typing import Any

import torch

ROPE_TYPES = ("linear", "dynamic", "llama3", "yarn")


def _powers(theta: float, dim: int) -> torch.Tensor:
    """theta^(2i / dim) for i < dim / 2, in float64."""
    return theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rope_frequencies(
    rotary_dim: int, theta: float, scaling: dict[str, Any] | None
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [R/2] fp32, the factor cos and sin are multiplied by)."""
    if scaling is None:
        return (1.0 / _powers(theta, rotary_dim)).float(), 1.0
    kind = scaling["rope_type"]
    factor = float(scaling["factor"])
    if kind == "linear":
        return (1.0 / (_powers(theta, rotary_dim) * factor)).float(), 1.0
    if kind == "dynamic":
        base = theta * (factor * factor - factor + 1) ** (rotary_dim / (rotary_dim - 2))
        return (1.0 / _powers(base, rotary_dim)).float(), 1.0
    if kind == "llama3":
        return _llama3(1.0 / _powers(theta, rotary_dim), factor, scaling).float(), 1.0
    if kind == "yarn":
        return _yarn(rotary_dim, theta, factor, scaling)
    raise ValueError(f"rope scaling type {kind!r} is not supported")  # _rope refuses it first


def _llama3(inv_freq: torch.Tensor, factor: float, scaling: dict[str, Any]) -> torch.Tensor:
    """Leave high frequencies alone, divide low ones by `factor`, and blend smoothly
    between the two wavelength bounds."""
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def yarn_attention_factor(factor: float, scaling: dict[str, Any]) -> float:
    """The cos/sin multiplier: `attention_factor` when given, else 0.1 ln(factor) + 1,
    or with `mscale` and `mscale_all_dim` both set the ratio of the two such terms."""
    given = scaling.get("attention_factor")
    if given is not None:
        return float(given)

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return mscale(float(m)) / mscale(float(m_all))
    return mscale(1.0)


def _yarn(
    dim: int, theta: float, factor: float, scaling: dict[str, Any]
) -> tuple[torch.Tensor, float]:
    """Dims that rotate fewer than beta_slow times over the original context are
    interpolated (/ factor), those rotating more than beta_fast times kept, a linear ramp
    between."""
    old_len = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of width 0 would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    powers = _powers(theta, dim)
    keep = 1 - ramp  # 1: the original frequency (extrapolation), 0: interpolated
    inv_freq = (1.0 / (factor * powers)) * (1 - keep) + (1.0 / powers) * keep
    return inv_freq.float(), yarn_attention_factor(factor, scaling)
