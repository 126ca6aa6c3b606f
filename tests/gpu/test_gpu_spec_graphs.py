"""CUDA graphs for speculative verification steps (worker/cuda_graphs.py, q = 1 + k).

Greedy n-gram speculation with graphs equals speculation run eagerly, and equals plain
decoding up to 16-bit near-ties; verification steps really replayed the 1 + k graphs.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.helpers import generate
from tests.test_golden import check_logprobs_close, prompts_of_different_lengths
from tests.tiny_models import tiny_model_hd64

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

pytest.importorskip("transformers")


def copy_prompts() -> list[list[int]]:
    """Prompts that repeat themselves, so n-gram lookup proposes, mixed with plain ones."""
    g = torch.Generator().manual_seed(2)
    out = []
    for n in (5, 9, 14):
        pattern = torch.randint(3, 512, (n,), generator=g).tolist()
        out.append([1, *pattern, *pattern, *pattern[: n // 2]])
    return out + prompts_of_different_lengths(4)


@pytest.mark.parametrize("k", [2, 4])
def test_spec_graphs_equal_spec_eager(tmp_path, stories_path, k):
    path = tiny_model_hd64(tmp_path, stories_path)
    args = dict(device="cuda", dtype="float16", block_size=16, max_num_seqs=16, max_model_len=512)
    spec = dict(speculative_method="ngram", num_speculative_tokens=k, ngram_prompt_lookup_max=3)
    for prompts in (copy_prompts(), copy_prompts()[:1]):  # batch 7 (bucket 8) and batch 1
        eager = generate(path, prompts, max_tokens=64, enforce_eager=True, **args, **spec)
        assert eager.replays == {}
        graphed = generate(path, prompts, max_tokens=64, **args, **spec)
        assert graphed.stats.spec_steps > 0 and graphed.stats.spec_proposed > 0
        assert graphed.replays[1 + k] > 0, "verification steps should replay the 1 + k graphs"
        # Same kernels on the same rows: identical tokens, logprobs within rounding.
        check_logprobs_close(graphed.out, eager.out, f"spec-graphs-k{k}", atol=2e-2)
        plain = generate(path, prompts, max_tokens=64, **args)
        assert 1 + k not in plain.replays and plain.replays[1] > 0
        # Lossless: greedy speculation is plain decoding (fp16 rounding aside).
        check_logprobs_close(graphed.out, plain.out, f"spec-vs-plain-k{k}", atol=0.1)


def test_draft_model_steps_replay_graphs(tmp_path, stories_path):
    """The draft's catch-up (q <= 2) and proposal (q = 1) steps replay its own graphs, with
    the same proposals as eagerly: the target as its own draft accepts every proposal."""
    path = tiny_model_hd64(tmp_path, stories_path)
    args = dict(device="cuda", dtype="float16", block_size=16, max_num_seqs=16, max_model_len=512)
    spec = dict(speculative_model=str(path), num_speculative_tokens=3)
    prompts = copy_prompts()
    eager = generate(path, prompts, max_tokens=48, enforce_eager=True, **args, **spec)
    assert eager.draft_replays == {}
    graphed = generate(path, prompts, max_tokens=48, **args, **spec)
    assert graphed.draft_replays[1] > 0 and graphed.draft_replays[2] > 0
    assert graphed.replays[4] > 0
    s = graphed.stats
    # Draft and target compute the same rows with other shapes: fp16 may flip a near-tie.
    assert s.spec_accepted >= 0.95 * s.spec_proposed
    check_logprobs_close(graphed.out, eager.out, "draft-graphs", atol=0.1)
