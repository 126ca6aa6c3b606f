"""Decode plan v3 (HEADRACE_DECODE_PLAN=v3, opt-in): the tensor-core decode kernel's variant
by the grid's size, and splits no shorter than two pipelines of that variant.

Why (cuda/decode_attention.py, plan v2, H200 measurements at cc98fa0):

- One variant per KV type. bf16 measured w2s3 best where the grid fills the GPU without
  splitting (batch 64: 512 blocks on 528 slots, 76.9 / 90.2 / 93.9% at 1k / 4k / 16k) and
  w4s3 best where it must split (8 x 16k: 83.4% against w2s3's 79.4). FP8's w4s4 (64 KB,
  3 blocks per SM, 396 slots) splits batch 64 into 3 (1,536 blocks, 4 waves, a merge per
  request): 41.9% at 64 x 1k, under bf16's 76.9% for half the bytes. At 48 KB a block (w4s3
  on FP8) 4 blocks fit an SM, 528 slots, and batch 64 .. 1024 run one split, no merge.
- 128-token splits at any batch. In a batch-1 graph (W1: bound 8,192, 60 splits of grid)
  a request of 129 .. 256 tokens runs 2 splits and the fused merge, 257 .. 384 three: the
  benchmark's 6.2 us at context 128 was the one length with 1 split (its 256 took 11.3 us,
  the profile's steps at 129 .. 150 took 15.9 us with w2s3, whose 64-thread merge walks
  4 heads x 128 dims in 8 serial rounds of L2 reads). A split shorter than two fills of
  the block's pipeline (warps x stages x 16 tokens) saves less latency than its merge
  costs, so v3's shortest split is max(128, 2 x warps x stages x 16) tokens: w4s3 384,
  w4s4 512. The grid width (from the bound) is v2's, so a long request still gets every
  split; only short ones run fewer (a graph captured at a long bound no longer cuts a
  short context into 128-token pieces).

The rule: blocks per split (`pairs` = batch x KV heads x 8-head chunks) at least 90% of one
wave at 4 blocks an SM -> the filling variant (bf16 w2s3, FP8 w4s3), else the splitting one
(bf16 w4s3, FP8 w4s4). For the four bf16 cells it picks what was measured fastest, with
the measured split counts (tests/test_decode_plan.py); every FP8 pick but 8 x 16k, and
every batch-1 plan, awaits the `decode3` step of scripts/gpu_bench.sh.
"""

from __future__ import annotations

FILL_BLOCKS_PER_SM = 4  # the filling variants' occupancy (48 KB of stages a block)
FULL_WAVE = 0.9  # as decode_attention.FULL_WAVE
MIN_CHUNK = 128  # as decode_attention.MIN_CHUNK
TILE = 16
PIPELINES_PER_SPLIT = 2
FILLING = {2: (2, 3), 1: (4, 3)}  # (warps, stages) by KV element bytes
SPLITTING = {2: (4, 3), 1: (4, 4)}


def fills_without_splitting(pairs: int, num_sms: int) -> bool:
    """Whether `pairs` blocks fill at least 90% of one wave of 4 blocks an SM."""
    return pairs >= FULL_WAVE * num_sms * FILL_BLOCKS_PER_SM


def pick(kv_bytes: int, pairs: int, num_sms: int) -> tuple[int, int]:
    """(warps, stages) of the variant for a grid of `pairs` blocks per split."""
    if kv_bytes not in FILLING:
        raise ValueError(f"kv_bytes must be 1 or 2, got {kv_bytes}")
    if pairs < 1 or num_sms < 1:
        raise ValueError(f"pairs and num_sms must be >= 1, got {pairs}, {num_sms}")
    table = FILLING if fills_without_splitting(pairs, num_sms) else SPLITTING
    return table[kv_bytes]


def min_chunk(splits: int, warps: int, stages: int) -> int:
    """Tokens of the shortest split: two fills of the block's pipeline, at least 128
    (a plan of one split cuts nothing: 128, as v2)."""
    if splits <= 1:
        return MIN_CHUNK
    return max(MIN_CHUNK, PIPELINES_PER_SPLIT * warps * stages * TILE)
