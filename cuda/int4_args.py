"""The arguments every W4A16 GEMV kernel starts with (gemv_m*, gemv_tiles, the split-K,
round 3 and round 4 GEMVs): x, its row stride, the weight's three arrays, y, its row
stride, N and K, in that order; each module appends its own tail."""

from __future__ import annotations

import numpy as np
import torch


def ptr(t: torch.Tensor) -> int:
    return int(t.data_ptr())


def weight_args(x: torch.Tensor, w: object, y: torch.Tensor) -> list:
    """[x, x_stride, qw, scales, zeros, y, y_stride, N, K] (w: an Int4Weight)."""
    return [
        ptr(x),
        np.int64(x.stride(0)),
        ptr(w.qw),  # type: ignore[attr-defined]
        ptr(w.scales),  # type: ignore[attr-defined]
        ptr(w.zeros),  # type: ignore[attr-defined]
        ptr(y),
        np.int64(y.stride(0)),
        np.int32(w.out_features),  # type: ignore[attr-defined]
        np.int32(w.in_features),  # type: ignore[attr-defined]
    ]
