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
    # Against the CPU path in bf16, at the first generated token (the prefill's logits). These
    # random models are chaotic in bf16: transformers' own bf16 moves top logprobs by ~1.0
    # from its fp32, and once a rounding flip (or, in Mixtral, a router near-tie picking the
    # other expert) changes a hidden state, later positions drift by more than any useful
    # bound (H200, 4f22da2: -4.23 vs -3.19, and Mixtral tokens outside each other's top 5 at
    # positions 10 and 16) while graphs vs eager above still agree to 2e-2. Wrong kernels
    # show at the first token; exactness over whole sequences is test_gpu_fp32_equals_cpu's.
    cpu = generate(path, prompts, max_tokens=60, device="cpu", dtype="bfloat16", block_size=16)
    first = [(toks[:1], lps[:1]) for toks, lps in graphed.out]
    cpu_first = [(toks[:1], lps[:1]) for toks, lps in cpu.out]
    check_logprobs_close(first, cpu_first, f"{kind}-bf16-vs-cpu-bf16", atol=1.0)
