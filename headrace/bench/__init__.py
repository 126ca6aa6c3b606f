"""`headrace bench ...`: benchmark programs (see BENCH.md). Results go to JSON files."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _offline_args(p: argparse.ArgumentParser) -> None:
    from headrace.bench.offline import add_args

    add_args(p)


def _structured_args(p: argparse.ArgumentParser) -> None:
    from headrace.bench.structured import add_args

    add_args(p)


def _serve_args(p: argparse.ArgumentParser) -> None:
    from gateway.bench_serve import add_bench_serve_args

    add_bench_serve_args(p)


COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], str]] = [
    ("latency", "W1: batch-1 decode latency", _offline_args, "headrace.bench.offline:latency_main"),
    (
        "throughput",
        "W2 / W3: offline throughput, all requests at once",
        _offline_args,
        "headrace.bench.offline:throughput_main",
    ),
    (
        "structured",
        "structured output: JSON-schema-constrained vs free decode, per output token",
        _structured_args,
        "headrace.bench.structured:structured_main",
    ),
    (
        "serve",
        "W4: OpenAI HTTP client with Poisson arrivals",
        _serve_args,
        "gateway.bench_serve:bench_serve_main",
    ),
]
