"""CUDA graphs for speculative verification steps (worker/cuda_graphs.py, q = 1 + k).

Greedy n-gram speculation with graphs equals speculation run eagerly, and equals plain
decoding up to 16-bit near-ties; verification steps really replayed the 1 + k graphs.
"""

from __future__ import annotations

import pytest
import torch

from ipc.messages import SamplingParams
from tests.test_golden import check_logprobs_close, prompts_of_different_lengths

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

pytest.importorskip("transformers")


def generate(path, prompts, max_tokens=64, **engine_args):
    from headrace.llm import LLM

    llm = LLM(str(path), **engine_args)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    out = []
    for r in llm.generate(prompts, params):
        o = r.outputs[0]
        out.append(
            (o.token_ids, [dict(zip(lp.token_ids, lp.logprobs, strict=True)) for lp in o.logprobs])
        )
    graphs = llm.engine.runner.graph_runner
    replays = dict(graphs.replays) if graphs is not None else {}
    stats = llm.engine.stats()
    del llm
    torch.cuda.empty_cache()
    return out, replays, stats


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
    from tests.gpu.test_gpu_engine import tiny_model_hd64

    path = tiny_model_hd64(tmp_path, stories_path)
    args = dict(device="cuda", dtype="float16", block_size=16, max_num_seqs=16, max_model_len=512)
    spec = dict(speculative_method="ngram", num_speculative_tokens=k, ngram_prompt_lookup_max=3)
    for prompts in (copy_prompts(), copy_prompts()[:1]):  # batch 7 (bucket 8) and batch 1
        eager, replays, _ = generate(path, prompts, enforce_eager=True, **args, **spec)
        assert replays == {}
        graphed, replays, stats = generate(path, prompts, **args, **spec)
        assert stats.spec_steps > 0 and stats.spec_proposed > 0
        assert replays[1 + k] > 0, "verification steps should replay the 1 + k graphs"
        # Same kernels on the same rows: identical tokens, logprobs within rounding.
        check_logprobs_close(graphed, eager, f"spec-graphs-k{k}", atol=2e-2)
        plain, plain_replays, _ = generate(path, prompts, **args)
        assert 1 + k not in plain_replays and plain_replays[1] > 0
        # Lossless: greedy speculation is plain decoding (fp16 rounding aside).
        check_logprobs_close(graphed, plain, f"spec-vs-plain-k{k}", atol=0.1)
