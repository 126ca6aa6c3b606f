"""The `headrace` command: generate, serve, worker, gateway, run-batch, bench.

Each subcommand's flags and main live in one module of headrace/ (`*_cmd.py`, serve.py,
bench/); they are imported only when the subcommand's parser is built or run, so
`headrace --help` stays fast and a missing server dependency only disables its commands.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

AddArgs = Callable[[argparse.ArgumentParser], None]
Main = Callable[[argparse.Namespace], int]


def _generate_args(p: argparse.ArgumentParser) -> None:
    from headrace.generate_cmd import add_generate_args

    add_generate_args(p)


def _generate(args: argparse.Namespace) -> int:
    from headrace.generate_cmd import generate_main

    return generate_main(args)


def _serve_args(p: argparse.ArgumentParser) -> None:
    from headrace.serve import add_serve_args

    add_serve_args(p)


def _serve(args: argparse.Namespace) -> int:
    from headrace.serve import serve_main

    return serve_main(args)


def _worker_args(p: argparse.ArgumentParser) -> None:
    from headrace.engine_args import add_engine_args
    from headrace.worker_cmd import add_worker_args

    add_engine_args(p, model_required=False)
    add_worker_args(p)


def _worker(args: argparse.Namespace) -> int:
    from headrace.worker_cmd import worker_main

    return worker_main(args)


def _gateway_args(p: argparse.ArgumentParser) -> None:
    from headrace.gateway_cmd import add_gateway_args

    add_gateway_args(p)


def _gateway(args: argparse.Namespace) -> int:
    from headrace.gateway_cmd import gateway_main

    return gateway_main(args)


def _run_batch_args(p: argparse.ArgumentParser) -> None:
    from headrace.run_batch_cmd import add_run_batch_args

    add_run_batch_args(p)


def _run_batch(args: argparse.Namespace) -> int:
    from headrace.run_batch_cmd import run_batch_main

    return run_batch_main(args)


def _offline_bench_args(p: argparse.ArgumentParser) -> None:
    from headrace.bench.offline import add_args

    add_args(p)


def _latency(args: argparse.Namespace) -> int:
    from headrace.bench.offline import latency_main

    return latency_main(args)


def _throughput(args: argparse.Namespace) -> int:
    from headrace.bench.offline import throughput_main

    return throughput_main(args)


def _structured_bench_args(p: argparse.ArgumentParser) -> None:
    from headrace.bench.structured import add_args

    add_args(p)


def _structured_bench(args: argparse.Namespace) -> int:
    from headrace.bench.structured import structured_main

    return structured_main(args)


def _serve_bench_args(p: argparse.ArgumentParser) -> None:
    from headrace.bench.serve import add_bench_serve_args

    add_bench_serve_args(p)


def _serve_bench(args: argparse.Namespace) -> int:
    from headrace.bench.serve import bench_serve_main

    return bench_serve_main(args)


COMMANDS: list[tuple[str, str, AddArgs, Main]] = [
    ("generate", "offline generation for a few prompts", _generate_args, _generate),
    ("serve", "serve a model over the OpenAI API (workers + gateway)", _serve_args, _serve),
    ("worker", "one engine behind a ZeroMQ socket", _worker_args, _worker),
    ("gateway", "the OpenAI HTTP API in front of workers", _gateway_args, _gateway),
    ("run-batch", "run an OpenAI batch file", _run_batch_args, _run_batch),
]
BENCH_COMMANDS: list[tuple[str, str, AddArgs, Main]] = [
    ("latency", "W1: batch-1 decode latency", _offline_bench_args, _latency),
    (
        "throughput",
        "W2 / W3: offline throughput, all requests at once",
        _offline_bench_args,
        _throughput,
    ),
    (
        "structured",
        "structured output: JSON-schema-constrained vs free decode, per output token",
        _structured_bench_args,
        _structured_bench,
    ),
    ("serve", "W4: OpenAI HTTP client with Poisson arrivals", _serve_bench_args, _serve_bench),
]


def _add_commands(
    sub: argparse._SubParsersAction, commands: list[tuple[str, str, AddArgs, Main]], prefix: str
) -> None:
    for name, help_, add_args, main in commands:
        p = sub.add_parser(name, help=help_)
        try:
            add_args(p)
        except ImportError as e:  # e.g. starlette missing: the offline commands still work
            p.set_defaults(func=_unavailable(prefix + name, e))
            continue
        p.set_defaults(func=main)


def _unavailable(what: str, error: ImportError) -> Main:
    def run(args: argparse.Namespace) -> int:
        raise ValueError(f"{what} is unavailable: {error}")

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headrace", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_commands(sub, COMMANDS, "")
    bench = sub.add_parser("bench", help="benchmarks (see BENCH.md)")
    _add_commands(bench.add_subparsers(dest="bench", required=True), BENCH_COMMANDS, "bench ")
    return parser


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
