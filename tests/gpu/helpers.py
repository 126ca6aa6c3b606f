"""What the GPU tests share: a tiny head_dim-64 model and a greedy generate() that reports
which CUDA graphs ran."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import torch

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
    del llm
    gc.collect()  # the engine's reference cycles would keep its KV cache for the next test
    torch.cuda.empty_cache()
    return result


def tiny_model_hd64(tmp_path, stories_path):
    """A random Llama with head_dim 64, so the CUDA kernels (not the fallback) run."""
    import shutil

    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path / "hd64"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories_path / f, path / f)
    return path
