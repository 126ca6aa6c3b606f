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
Group = Callable[[], dict[str, tuple[AddArgs, Main]]]


# Each group imports the modules of its commands (flags, main) when the parser is built; a
# group whose packages are missing leaves its commands unavailable, not the whole CLI.
def _engine_commands() -> dict[str, tuple[AddArgs, Main]]:
    """Commands that need only the engine's packages (torch, pyzmq, tokenizers)."""
    from headrace import generate_cmd, worker_cmd
    from headrace.bench import kernels, offline, structured

    return {
        "generate": (generate_cmd.add_generate_args, generate_cmd.generate_main),
        "worker": (_worker_args, worker_cmd.worker_main),
        "bench latency": (offline.add_args, offline.latency_main),
        "bench throughput": (offline.add_args, offline.throughput_main),
        "bench structured": (structured.add_args, structured.structured_main),
        "bench kernels": (kernels.add_args, kernels.kernels_main),
    }


def _worker_args(p: argparse.ArgumentParser) -> None:
    from headrace.engine_args import add_engine_args
    from headrace.worker_cmd import add_worker_args

    add_engine_args(p, model_required=False)
    add_worker_args(p)


def _gateway_commands() -> dict[str, tuple[AddArgs, Main]]:
    """Commands that also need the gateway's packages (starlette, uvicorn)."""
    from headrace import gateway_cmd, run_batch_cmd, serve

    return {
        "serve": (serve.add_serve_args, serve.serve_main),
        "gateway": (gateway_cmd.add_gateway_args, gateway_cmd.gateway_main),
        "run-batch": (run_batch_cmd.add_run_batch_args, run_batch_cmd.run_batch_main),
    }


def _client_commands() -> dict[str, tuple[AddArgs, Main]]:
    """Commands that only talk HTTP to a running server (httpx)."""
    from headrace.bench import serve as bench_serve

    return {"bench serve": (bench_serve.add_bench_serve_args, bench_serve.bench_serve_main)}


COMMANDS: list[tuple[str, str, Group]] = [
    ("generate", "offline generation for a few prompts", _engine_commands),
    ("serve", "serve a model over the OpenAI API (workers + gateway)", _gateway_commands),
    ("worker", "one engine behind a ZeroMQ socket", _engine_commands),
    ("gateway", "the OpenAI HTTP API in front of workers", _gateway_commands),
    ("run-batch", "run an OpenAI batch file", _gateway_commands),
]
BENCH_COMMANDS: list[tuple[str, str, Group]] = [
    ("latency", "W1: batch-1 decode latency", _engine_commands),
    ("throughput", "W2 / W3: offline throughput, all requests at once", _engine_commands),
    (
        "structured",
        "structured output: JSON-schema-constrained vs free decode, per output token",
        _engine_commands,
    ),
    ("serve", "W4: OpenAI HTTP client with Poisson arrivals", _client_commands),
    ("kernels", "attention kernels: decode old vs new, prefill vs SDPA (GPU)", _engine_commands),
]


def _add_commands(
    sub: argparse._SubParsersAction, commands: list[tuple[str, str, Group]], prefix: str
) -> None:
    for name, help_, group in commands:
        p = sub.add_parser(name, help=help_)
        try:
            add_args, main = group()[prefix + name]
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
