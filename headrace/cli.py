"""The `headrace` command: generate, serve, worker, gateway, run-batch, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from worker.args import add_engine_args, engine_config_from_args


def _generate_args(p: argparse.ArgumentParser) -> None:
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

    config = engine_config_from_args(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.sampling_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
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


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(args) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headrace", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="offline generation for a few prompts")
    _generate_args(p)
    p.set_defaults(func=generate_main)

    _add_server_commands(sub)
    _add_bench_commands(sub)
    return parser


def _add_server_commands(sub: argparse._SubParsersAction) -> None:
    try:
        from gateway import commands
    except ImportError:  # gateway not installed in this build
        return
    for name, help_, add_args, main_name in commands.COMMANDS:
        p = sub.add_parser(name, help=help_)
        try:
            add_args(p)
        except ImportError as e:  # e.g. starlette missing: offline commands still work
            p.set_defaults(func=_unavailable(name, e))
            continue
        p.set_defaults(func=_lazy("gateway.commands", main_name))


def _add_bench_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (see BENCH.md)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    try:
        from headrace import bench as benches
    except ImportError:
        return
    for name, help_, add_args, main_name in benches.COMMANDS:
        p = bsub.add_parser(name, help=help_)
        try:
            add_args(p)
        except ImportError as e:
            p.set_defaults(func=_unavailable(f"bench {name}", e))
            continue
        p.set_defaults(func=_lazy(main_name.rsplit(":", 1)[0], main_name.rsplit(":", 1)[1]))


def _unavailable(what: str, error: ImportError) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise ValueError(f"{what} is unavailable: {error}")

    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"headrace: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
