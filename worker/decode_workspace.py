"""How big the flash-decoding workspace must be for a batch, without asking the kernels.

Both decode kernels (cuda/decode_attention.py, the older cuda/paged_attention_kernels.py)
pick their split count from the grid: blocks = batch x KV heads x query-head chunks (>= 1
per KV head), and they take the fewest splits whose last wave of blocks on the GPU's
`slots` (SMs x resident blocks, at most 2048 / 128 = 16 per SM) is >= 90% full, at most
MAX_SPLITS. Any split count s with blocks x s >= 9 x slots gives waves >= 9/10 full, so
the chosen s <= ceil(9 x slots / blocks) < 9 x slots / (batch x KV heads) + 1, and

    batch x s <= min(MAX_SPLITS x batch, 9 x slots / KV heads + batch)

which grows with the batch: sized for the largest CUDA-graph bucket first, the workspace
never has to grow for a smaller one (earlier graphs keep its address). Sizing every batch
for MAX_SPLITS instead cost 1.08 GB at batch 1024 (Llama-3-8B); this bound gives 60 MB.
The kernels still check the size they need (a ValueError, never an overrun).
"""

from __future__ import annotations

MAX_SPLITS = 64  # cuda/decode_attention.py and cuda/paged_attention_kernels.py
MAX_BLOCKS_PER_SM = 16  # 2048 resident threads per SM / 128-thread decode blocks
FULL_WAVES = 9  # waves at least 9/10 full: the kernels' 0.9 threshold


def workspace_numel(
    batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, num_sms: int
) -> int:
    """fp32 elements of a decode workspace that fits either kernel's plan for `batch`."""
    for name, v in (("batch", batch), ("num_kv_heads", num_kv_heads), ("num_sms", num_sms)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    slots = num_sms * MAX_BLOCKS_PER_SM
    row_splits = min(MAX_SPLITS * batch, -(-FULL_WAVES * slots // num_kv_heads) + batch)
    return row_splits * num_q_heads * (head_dim + 1)
