"""The decode workspace bound (worker/decode_workspace.py) against both kernels' plans."""

from __future__ import annotations

import itertools

import pytest

from cuda.decode_attention import plan_decode
from cuda.paged_attention_kernels import decode_num_splits, decode_workspace_numel
from worker.cuda_graphs import bucket_sizes
from worker.decode_workspace import MAX_BLOCKS_PER_SM, workspace_numel

HEAD_DIM = 128


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(32, 8), (64, 8), (32, 32), (8, 1), (28, 4)])
def test_bound_covers_both_kernels_plans(q_heads: int, kv_heads: int) -> None:
    group = q_heads // kv_heads
    for batch, seq_len, sms, per_sm in itertools.product(
        [*range(1, 70), 96, 100, 128, 255, 256, 300, 512, 700, 1000, 1024],
        [1, 100, 2048, 8192, 131072],
        [1, 16, 78, 132],
        [1, 3, 4, MAX_BLOCKS_PER_SM],
    ):
        bound = workspace_numel(batch, q_heads, kv_heads, HEAD_DIM, sms)
        old = decode_num_splits(batch, kv_heads, group, seq_len, sms * per_sm)
        new = plan_decode(batch, kv_heads, group, seq_len, sms, per_sm).splits
        for splits in (old, new):
            need = decode_workspace_numel(batch, q_heads, HEAD_DIM, splits)
            assert need <= bound, (batch, seq_len, sms, per_sm, splits)


def test_bound_grows_with_the_batch_so_graphs_never_regrow_it() -> None:
    sizes = [workspace_numel(b, 32, 8, HEAD_DIM, 132) for b in bucket_sizes(1024)]
    assert sizes == sorted(sizes)
    # What it saves at the largest bucket: 64 splits per row were 1.08 GB (Llama-3-8B).
    assert sizes[-1] * 4 < 64e6 < decode_workspace_numel(1024, 32, HEAD_DIM, 64) * 4 / 16


def test_bound_rejects_empty_shapes() -> None:
    with pytest.raises(ValueError, match="num_sms"):
        workspace_numel(4, 32, 8, HEAD_DIM, 0)
