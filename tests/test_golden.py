"""Golden tests: headrace's greedy tokens and logprobs against Hugging Face transformers.

Tiny random Llama, Mistral and Qwen2 models are built and saved by the test
(tests/tiny_models.py); stories260K is
a real trained model. The engine runs with block_size 4, a small token budget (prefills are
chunked) and so few KV blocks that requests are preempted and recomputed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from ipc.messages import SamplingParams
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.golden

NUM_LOGPROBS = 5
MAX_TOKENS = 12


def load_hf(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy_one(
    model: Any, prompt: list[int], max_tokens: int = MAX_TOKENS
) -> tuple[list[int], list[dict[int, float]], torch.Tensor]:
    """Greedy tokens and their top logprobs, and the prompt rows' log-softmax [P, V] (row p
    holds the logprobs of the token after prompt position p: prompt logprobs)."""
    ids = list(prompt)
    toks: list[int] = []
    lps: list[dict[int, float]] = []
    prompt_logp = torch.empty(0)
    for step in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits[-1], -1)
        if step == 0:
            prompt_logp = torch.log_softmax(logits, -1)
        top = torch.topk(logp, NUM_LOGPROBS)
        t = int(top.indices[0])
        toks.append(t)
        lps.append({int(i): float(v) for i, v in zip(top.indices, top.values, strict=True)})
        ids.append(t)
    return toks, lps, prompt_logp


def hf_greedy(
    path: Path, prompts: list[list[int]]
) -> list[tuple[list[int], list[dict[int, float]]]]:
    model = load_hf(path)
    return [hf_greedy_one(model, prompt)[:2] for prompt in prompts]


def check_logprobs_close(ours, theirs, name: str, atol: float = 1e-3) -> None:
    """Tokens equal; where they differ, each side's choice is in the other's top logprobs
    (a near-tie) and the comparison stops for that sequence, as vLLM's check does."""
    for i, ((o_toks, o_lps), (h_toks, h_lps)) in enumerate(zip(ours, theirs, strict=True)):
        for pos, (ot, ht) in enumerate(zip(o_toks, h_toks, strict=False)):
            o_top, h_top = o_lps[pos], h_lps[pos]
            if ot != ht:
                assert ot in h_top and ht in o_top, (
                    f"{name} prompt {i} pos {pos}: ours {ot} vs HF {ht}, not a near-tie"
                )
                break
            assert math.isclose(o_top[ot], h_top[ht], abs_tol=atol), (
                f"{name} prompt {i} pos {pos}: logprob {o_top[ot]} vs HF {h_top[ht]}"
            )
            for tok, lp in h_top.items():
                if tok in o_top:
                    assert math.isclose(o_top[tok], lp, abs_tol=atol)
        else:
            assert len(o_toks) == len(h_toks), f"{name} prompt {i}: lengths differ"


def run_headrace(path: Path, prompts: list[list[int]], **engine_args):
    from headrace.llm import LLM

    llm = LLM(str(path), **engine_args)
    params = SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=NUM_LOGPROBS
    )
    results = llm.generate(prompts, params)
    out = []
    for r in results:
        o = r.outputs[0]
        assert o.logprobs is not None and len(o.logprobs) == len(o.token_ids)
        lps = [dict(zip(lp.token_ids, lp.logprobs, strict=True)) for lp in o.logprobs]
        out.append((o.token_ids, lps))
    return out, llm.engine


def prompts_of_different_lengths(n: int = 9, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = [1, 3, 4, 5, 8, 13, 17, 23, 31][:n]
    return [[1, *torch.randint(3, vocab, (length,), generator=g).tolist()] for length in lengths]


ENGINE_ARGS = dict(
    block_size=4,
    max_num_batched_tokens=16,  # prefills are chunked
    num_gpu_blocks=18,  # 72 token slots for 9 requests of up to 44 tokens: preemption
    max_num_seqs=8,
    device="cpu",
)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_tiny_random_models_match_transformers(kind, tmp_path, stories_path):
    path = make_tiny_model(kind, tmp_path / kind, stories_path)
    prompts = prompts_of_different_lengths()
    ours, engine = run_headrace(path, prompts, **ENGINE_ARGS)
    assert engine.scheduler.num_preemptions > 0, "the test meant to force preemption"
    check_logprobs_close(ours, hf_greedy(path, prompts), kind)


@pytest.mark.parametrize(
    "kind,overrides",
    [
        # Qwen2 windows only the layers from max_window_layers on (config layer_types).
        ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=2)),
        ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=0)),
        ("mistral", dict(sliding_window=6)),  # every layer
    ],
)
def test_sliding_window_layers_match_transformers(kind, overrides, tmp_path, stories_path):
    """Prompts and outputs run past the window, so a layer windowed by mistake (or not
    windowed) changes the logits."""
    path = make_tiny_model(kind, tmp_path / kind, stories_path, **overrides)
    prompts = prompts_of_different_lengths()[3:]
    ours, _ = run_headrace(path, prompts, **ENGINE_ARGS)
    check_logprobs_close(ours, hf_greedy(path, prompts), f"{kind} {overrides}")


def test_stories260k_matches_transformers(stories_path):
    from gateway.tokenizer import load_tokenizer

    tok = load_tokenizer(str(stories_path))
    texts = [
        "Once upon a time",
        "Lily",
        "The dog ran to the park and",
        "One day, a little bird",
        "Tom had a big red",
        "She",
        "The sun was shining and the birds were singing. Mia",
        "Ben and",
    ]
    prompts = [tok.encode(t) for t in texts]
    ours, engine = run_headrace(stories_path, prompts, **ENGINE_ARGS)
    assert engine.scheduler.num_preemptions > 0
    check_logprobs_close(ours, hf_greedy(stories_path, prompts), "stories260K")


def test_chunked_prefill_and_preemption_do_not_change_outputs(tmp_path, stories_path):
    path = make_tiny_model("llama", tmp_path / "llama", stories_path)
    prompts = prompts_of_different_lengths()
    constrained, _ = run_headrace(path, prompts, **ENGINE_ARGS)
    roomy, engine = run_headrace(
        path, prompts, block_size=16, device="cpu", kv_cache_memory_gb=0.01
    )
    assert engine.scheduler.num_preemptions == 0
    assert [t for t, _ in constrained] == [t for t, _ in roomy]
