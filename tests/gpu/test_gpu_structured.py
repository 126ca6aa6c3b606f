"""Structured output on the GPU: the bitmask applied on device equals the CPU result, and
a CUDA-graph engine's constrained outputs follow their grammar and match the CPU's."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.helpers import constrained_generation
from worker.structured import apply_bitmask

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.mark.parametrize("vocab", [128256, 32000, 100])
def test_apply_bitmask_cuda_equals_cpu(vocab):
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    logits = torch.randn(64, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (64, words), dtype=torch.int32, generator=gen)
    bitmask[3] = -1  # an unconstrained row
    cpu = logits.clone()
    apply_bitmask(cpu, bitmask)
    gpu = logits.cuda()
    apply_bitmask(gpu, bitmask.cuda())
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(cpu[3], logits[3])


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_constrained_generation_gpu_equals_cpu(stories_path, async_scheduling):
    gpu = constrained_generation(stories_path, "cuda", async_scheduling=async_scheduling)
    assert gpu == constrained_generation(stories_path, "cpu")


def test_step_masks_on_cuda_equal_the_synchronous_fill():
    """Pinned buffers, non-blocking copies and the mask thread on a real device."""
    from tests.test_grammar_masks import check_random_batch, compile_grammars

    compiled = compile_grammars()
    for seed in range(3):
        check_random_batch(compiled, seed, torch.device("cuda"))
