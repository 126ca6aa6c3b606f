"""KV compression on a GPU: the compaction on CUDA equals the CPU's, and decode steps of
compressed requests replay CUDA graphs with the same results as eager (SnapKV's lengths
and positions are step inputs; with --kv-compression pyramidkv the graphs also read
per-layer lengths)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.gpu.helpers import generate
from tests.test_golden import check_logprobs_close
from tests.tiny_models import tiny_model_hd64

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def long_prompts(n: int = 6, length: int = 300) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 500) for _ in range(length + 13 * i)] for i in range(n)]


def test_compaction_on_cuda_equals_cpu():
    from worker.kv_compaction import compact_layer, select_positions, snapkv_votes

    torch.manual_seed(0)
    cache = torch.randn(2, 64, 16, 8, 128)
    q = torch.randn(32, 32, 128)
    old = torch.arange(40)
    new = torch.arange(40, 56)
    k = cache[0, :40].reshape(-1, 8, 128)[:600]
    votes = snapkv_votes(q, k, 128**-0.5)
    votes_gpu = snapkv_votes(q.cuda(), k.cuda(), 128**-0.5)
    torch.testing.assert_close(votes_gpu.cpu(), votes, rtol=1e-4, atol=1e-7)
    keep = select_positions(votes, 600, 250)
    # (top-k of nearly equal votes may differ by rounding: compact with the same choice)
    gpu = cache.cuda()
    compact_layer(cache, old, new, keep)
    compact_layer(gpu, old.cuda(), new.cuda(), keep.cuda())
    assert torch.equal(gpu.cpu(), cache)


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv"])
def test_compressed_decode_graphs_equal_eager(tmp_path, stories_path, method):
    path = tiny_model_hd64(tmp_path, stories_path)
    args = dict(
        device="cuda", dtype="float16", block_size=16, max_num_seqs=16, max_model_len=512,
        kv_compression=method, kv_compression_budget=0.25, kv_compression_min_prompt_len=100,
    )  # fmt: skip
    prompts = [*long_prompts(), list(range(40, 60))]  # the short one stays uncompressed
    eager = generate(path, prompts, max_tokens=64, enforce_eager=True, **args)
    graphed = generate(path, prompts, max_tokens=64, **args)
    assert graphed.graphs
    assert graphed.replays[1] > 0  # compressed requests' decode steps replayed graphs
    check_logprobs_close(graphed.out, eager.out, f"kvcomp-{method}", atol=2e-2)


def test_compressed_gpu_equals_cpu(tmp_path, stories_path):
    path = tiny_model_hd64(tmp_path, stories_path)
    args = dict(
        kv_compression="snapkv", kv_compression_budget=0.25, kv_compression_min_prompt_len=0
    )
    cpu = generate(path, long_prompts(3), max_tokens=32, device="cpu", **args)
    gpu = generate(path, long_prompts(3), max_tokens=32, device="cuda", dtype="float32", **args)
    check_logprobs_close(gpu.out, cpu.out, "kvcomp-gpu-vs-cpu", atol=1e-2)
