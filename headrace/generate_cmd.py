"""`headrace generate`: offline generation for a few prompts through `LLM` (headrace/llm.py)."""

from __future__ import annotations

import argparse
import json

from headrace.engine_args import add_engine_args, engine_config_from_args


def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def generate_main(args: argparse.Namespace) -> int:
    from headrace.llm import LLM
    from ipc.messages import SamplingParams

    config = engine_config_from_args(args, usage_context="offline")
    # The sampling flags are named as SamplingParams' fields, but for the seed (--seed is
    # the engine's).
    names = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "ignore_eos")
    params = SamplingParams(
        **{name: getattr(args, name) for name in names},
        seed=args.sampling_seed,
        logprobs=args.logprobs,
    )
    params.validate(config.max_logprobs)
    fields = {f: getattr(config, f) for f in config.__dataclass_fields__ if f != "model"}
    llm = LLM(config.model, **fields)
    if args.chat:
        results = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        results = llm.generate(args.prompt, params)
    for prompt, r in zip(args.prompt, results, strict=True):
        o = r.outputs[0]
        if args.json:
            obj = {
                "prompt": prompt,
                "text": o.text,
                "token_ids": o.token_ids,
                "prompt_token_ids": r.prompt_token_ids,
                "finish_reason": o.finish_reason,
            }
            if o.logprobs is not None:
                obj["logprobs"] = [lp.logprobs[0] for lp in o.logprobs]
            print(json.dumps(obj, ensure_ascii=False))
        else:
            print(o.text if args.chat else prompt + o.text)
    return 0
