"""What the GPU tests share: a greedy generate() that reports which CUDA graphs ran (their
tiny head_dim-64 model is tests/tiny_models.py's tiny_model_hd64)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ipc.messages import SamplingParams

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
