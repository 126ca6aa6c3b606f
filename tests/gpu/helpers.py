"""What the GPU tests share: a greedy generate() that reports which CUDA graphs ran (their
tiny head_dim-64 model is tests/tiny_models.py's tiny_model_hd64)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from ipc.messages import GrammarKind, GuidedDecoding, SamplingParams

Output = tuple[list[int], list[dict[int, float]]]  # token ids, top-5 logprobs per token


@dataclass
class Generated:
    out: list[Output]
    graphs: bool  # the target captured CUDA graphs
    replays: dict[int, int] = field(default_factory=dict)  # target: q bound -> replays
    draft_replays: dict[int, int] = field(default_factory=dict)  # the draft model's
    stats: Any = None  # WorkerStats


def generate(path, prompts, max_tokens: int = 24, **engine_args) -> Generated:
    from headrace.llm import LLM

    if engine_args.get("device") == "cuda" and "gpu_memory_utilization" not in engine_args:
        # A fixed KV size instead of 90% of the card: tiny models need little, the tests
        # start faster, and several test processes can share one GPU.
        engine_args.setdefault("kv_cache_memory_gb", 2.0)
    llm = LLM(str(path), **engine_args)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    out = []
    for r in llm.generate(prompts, params):
        o = r.outputs[0]
        out.append(
            (o.token_ids, [dict(zip(lp.token_ids, lp.logprobs, strict=True)) for lp in o.logprobs])
        )
    graphs = llm.engine.runner.graph_runner
    draft = getattr(llm.engine.proposer, "graph_runner", None)
    result = Generated(
        out,
        graphs is not None,
        dict(graphs.replays) if graphs is not None else {},
        dict(draft.replays) if draft is not None else {},
        llm.engine.stats(),
    )
    llm.close()  # the KV cache, graphs and weights go now, not when a cycle is collected
    return result


def constrained_generation(stories_path, device: str, **engine_args: Any) -> list[list[int]]:
    """Greedy outputs of two constrained requests and a free one on `device`, after checking
    that every constrained answer is complete, valid JSON (the CPU half also runs
    in CI: tests/test_structured_engine.py)."""
    from headrace import LLM

    # Bounded everywhere (a name of at most 8 characters, n in 0..99), so the object always
    # closes within max_tokens: unbounded, stories260K wrote an endless integer.
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    guided = GuidedDecoding(GrammarKind.JSON_SCHEMA, json.dumps(schema))
    prompts = ["Once upon a time", "Lily", "The dog"]
    params = [
        SamplingParams(temperature=0, max_tokens=64, guided=guided),
        SamplingParams(temperature=0, max_tokens=16),
        SamplingParams(temperature=0, max_tokens=64, guided=guided),
    ]
    if device == "cuda":  # a fixed KV size: other test processes share the card
        engine_args.setdefault("kv_cache_memory_gb", 1.0)
    llm = LLM(str(stories_path), device=device, dtype="float32", max_num_seqs=8, **engine_args)
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    for o, p in zip(outs, params, strict=True):
        if p.guided is not None:
            assert o.finish_reason == "stop", o.text
            value = json.loads(o.text)
            assert set(value) == {"name", "n"} and 0 <= value["n"] <= 99, o.text
    llm.close()
    return [o.token_ids for o in outs]


@pytest.fixture
def new_decode_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensor-core decode kernel with its defaults: no variant, plan, FP8-math or merge
    override from the environment (tests/gpu/test_gpu_decode_*.py use it autouse)."""
    from cuda import decode_attention as da

    monkeypatch.setenv(da.ENV, "new")
    for name in (da.CONFIG_ENV, da.FUSED_MERGE_ENV, da.PLAN_ENV, da.FP8_MATH_ENV):
        monkeypatch.delenv(name, raising=False)


# Prompt lengths whose chunks (a 96-token budget) land beside decoding requests: mixed steps.
MIXED_STEP_LENGTHS = (1, 5, 31, 33, 90, 130, 200, 257, 300, 17, 64, 2)
MIXED_STEP_ARGS = dict(block_size=16, max_num_seqs=16, max_model_len=512, max_num_batched_tokens=96)


def mixed_step_prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, 512, (n,), generator=g).tolist()] for n in MIXED_STEP_LENGTHS]
