"""The server-side `headrace` subcommands, for headrace/cli.py to wire up.

Each entry: (name, help, function adding its flags to a parser, name of its main here).
Imports are lazy so `headrace --help` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    from headrace.serve import add_serve_args

    add_serve_args(p)


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    from worker.args import add_engine_args
    from worker.server_cli import add_worker_args

    add_engine_args(p)
    add_worker_args(p)


def _add_gateway_args(p: argparse.ArgumentParser) -> None:
    from gateway.app import add_gateway_args

    add_gateway_args(p)


def _add_run_batch_args(p: argparse.ArgumentParser) -> None:
    from gateway.run_batch import add_run_batch_args

    add_run_batch_args(p)


def serve_main(args: argparse.Namespace) -> int:
    from headrace.serve import serve_main as main

    return main(args)


def worker_main(args: argparse.Namespace) -> int:
    from worker.server_cli import worker_main as main

    main(args)
    return 0


def gateway_main(args: argparse.Namespace) -> int:
    from gateway.app import gateway_main as main

    main(args)
    return 0


def run_batch_main(args: argparse.Namespace) -> int:
    from gateway.run_batch import run_batch_main as main

    return main(args)


COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], str]] = [
    (
        "serve",
        "serve a model over the OpenAI API (workers + gateway)",
        _add_serve_args,
        "serve_main",
    ),
    ("worker", "one engine behind a ZeroMQ socket", _add_worker_args, "worker_main"),
    ("gateway", "the OpenAI HTTP API in front of workers", _add_gateway_args, "gateway_main"),
    ("run-batch", "run an OpenAI batch file", _add_run_batch_args, "run_batch_main"),
]
