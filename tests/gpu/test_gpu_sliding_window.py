"""Sliding-window attention in the CUDA paged attention kernels against the torch
reference (GPU only), with test_gpu_kernels.py's poisoned paged batches and accuracy bar."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_gpu_kernels import Batch, decode_reqs, prefill_reqs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def run(b: Batch, window: int, **kw: object) -> torch.Tensor:
    out = b.run(sliding_window=window, **kw)
    assert torch.isfinite(out).all(), "unwritten or NaN output elements"
    ref = b.reference(sliding_window=window)
    err = (out.float() - ref).abs().max().item()
    base = (b.lowp(window).float() - ref).abs().max().item()
    assert err <= 2 * base + 2e-3, f"window {window}: error {err:.3g} vs torch {base:.3g}"
    return out


@pytest.mark.parametrize("window", [1, 5, 16, 100, 700, 5000])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sliding_window_decode_and_prefill(dtype, head_dim, group, window) -> None:
    for reqs in (decode_reqs(4), prefill_reqs()):
        b = Batch(reqs, num_kv_heads=2, group=group, head_dim=head_dim, block_size=16, dtype=dtype)
        run(b, window)
    b = Batch(
        decode_reqs(4), num_kv_heads=2, group=group, head_dim=head_dim, block_size=16, dtype=dtype
    )
    run(b, window, max_seq_len=65536)  # a graph's larger seq_len bound changes nothing


def test_window_larger_than_context_equals_no_window() -> None:
    b = Batch(
        prefill_reqs(), num_kv_heads=2, group=4, head_dim=128, block_size=16, dtype=torch.bfloat16
    )
    assert torch.equal(b.run(sliding_window=1 << 20), b.run())
