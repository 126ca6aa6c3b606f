"""Falcon, GPT-NeoX and Mixtral on the GPU: greedy tokens equal the CPU path's, and CUDA
graph replays equal eager steps (GPU only). The tiny models are tests/tiny_models.py's
layouts with head_dim 64, so the CUDA attention kernels (not the fallback) run."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.helpers import generate
from tests.test_golden import check_logprobs_close, prompts_of_different_lengths
from tests.tiny_models import LAYOUTS, make_tiny_model

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

# head_dim 64 everywhere; Mixtral's sizes are multiples of 8 so torch._grouped_mm runs.
HD64: dict[str, dict] = {
    "falcon-7b-style": dict(hidden_size=256, num_attention_heads=4),
    "falcon-new-arch": dict(hidden_size=256, num_attention_heads=4, num_kv_heads=2),
    "falcon-sequential": dict(hidden_size=256, num_attention_heads=4),
    "gpt-neox-parallel": dict(hidden_size=256, num_attention_heads=4, intermediate_size=512),
    "gpt-neox-sequential": dict(hidden_size=256, num_attention_heads=4, intermediate_size=512),
    "mixtral": dict(hidden_size=256, num_attention_heads=4, head_dim=64, intermediate_size=256),
    "mixtral-sliding-window": dict(
        hidden_size=256, num_attention_heads=4, head_dim=64, intermediate_size=256
    ),
}
assert set(HD64) == set(LAYOUTS)


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_gpu_fp32_equals_cpu(kind, tmp_path, stories_path):
    path = make_tiny_model(kind, tmp_path / kind, stories_path, **HD64[kind])
    prompts = prompts_of_different_lengths()
    cpu = generate(path, prompts, device="cpu", block_size=4, max_num_batched_tokens=16)
    gpu = generate(path, prompts, device="cuda", dtype="float32", block_size=16)
    assert [t for t, _ in gpu.out] == [t for t, _ in cpu.out]


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_gpu_bf16_graphs_equal_eager_and_cpu(kind, tmp_path, stories_path):
    path = make_tiny_model(kind, tmp_path / kind, stories_path, **HD64[kind])
    prompts = prompts_of_different_lengths()
    args = dict(device="cuda", dtype="bfloat16", block_size=16, max_num_seqs=32, max_model_len=256)
    eager = generate(path, prompts, max_tokens=60, enforce_eager=True, **args)
    graphed = generate(path, prompts, max_tokens=60, **args)
    assert graphed.graphs and graphed.replays[1] > 0, "decode steps should replay graphs"
    check_logprobs_close(graphed.out, eager.out, f"{kind}-graphs", atol=2e-2)
    # Against the CPU path in bf16 too: these random models are ill-conditioned enough that
    # bf16 itself moves top logprobs by ~1.0 from fp32 (transformers' bf16 vs fp32 as well:
    # 1.04 for gpt-neox-parallel), so an fp32 reference would test bf16, not the kernels.
    # Exact agreement with fp32 is test_gpu_fp32_equals_cpu's job.
    # Mixtral's router is discontinuous: a bf16 near-tie between two experts' gates picks the
    # other expert on one side (H200: a top logprob -3.67 vs -4.71 on the CPU), so MoE gets
    # twice the room; graphs vs eager above stays strict, and fp32 matches token for token.
    cpu = generate(path, prompts, max_tokens=60, device="cpu", dtype="bfloat16", block_size=16)
    atol = 2.0 if kind.startswith("mixtral") else 1.0
    check_logprobs_close(graphed.out, cpu.out, f"{kind}-bf16-vs-cpu-bf16", atol=atol)
