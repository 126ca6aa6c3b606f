"""`headrace worker`: one engine behind a ZeroMQ socket (worker/server.py).

The one way a worker process starts: by hand or systemd with engine flags, or by
`headrace serve` / `run-batch` with `--config-json` (the EngineConfig as JSON, not pickled).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import msgspec

from headrace.engine_args import engine_config_from_args
from worker.admission import add_admission_args, admission_from_args
from worker.config import EngineConfig
from worker.errors import FatalEngineError
from worker.server import Engine, WorkerServer

DEFAULT_BIND = "tcp://127.0.0.1:5550"


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `headrace worker` beyond the engine's (headrace.engine_args)."""
    g = parser.add_argument_group("worker")
    g.add_argument(
        "--bind",
        default=DEFAULT_BIND,
        help=f"ZeroMQ address to serve gateways on: ipc:///path or tcp://host:port "
        f"(default {DEFAULT_BIND})",
    )
    g.add_argument("--worker-id", default=None, help="name in logs and /health (default: host:pid)")
    g.add_argument(
        "--heartbeat-interval", type=float, default=0.1, help="seconds between heartbeats"
    )
    g.add_argument(
        "--gateway-timeout",
        type=float,
        default=10.0,
        help="abort a gateway's requests after this many silent seconds",
    )
    add_admission_args(g)
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let requests in flight finish (new ones are refused)",
    )
    g.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="also answer GET /health over HTTP on this port (readiness probes); off by default",
    )
    g.add_argument(
        "--health-host",
        default="127.0.0.1",
        help="host the --health-port endpoint binds (default 127.0.0.1; 0.0.0.0 in a pod)",
    )
    g.add_argument(
        "--fake-engine",
        action="store_true",
        help="BENCHMARKING TOOL, not for serving: run worker.fake_engine.FakeEngineCore, "
        "which loads no model and emits one fixed-text token per running request per step; "
        "--model only needs a tokenizer.json (see scripts/bench_gateway.py)",
    )
    g.add_argument(
        "--fake-step-ms",
        type=float,
        default=0.0,
        help="with --fake-engine: milliseconds from one step's start to the next, slept like "
        "GPU time (default 0: back to back)",
    )
    g.add_argument(
        "--config-json",
        default=None,
        help="the whole EngineConfig as a JSON object instead of engine flags "
        "(how `headrace serve` starts its workers)",
    )
    g.add_argument(
        "--parent-pid", type=int, default=None, help="exit when the process with this id exits"
    )


def worker_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig from --config-json, else from the engine flags."""
    if args.config_json is None:
        if args.model is None:
            raise ValueError("--model is required (or --config-json)")
        return engine_config_from_args(args)
    try:
        config = msgspec.json.decode(args.config_json.encode(), type=EngineConfig)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ValueError(f"--config-json: {e}") from None
    config.validate()
    return config


def engine_factory(config: EngineConfig, args: argparse.Namespace) -> Callable[[], Engine]:
    """EngineCore, or with --fake-engine the model-free benchmarking engine."""

    def build() -> Engine:
        if args.fake_engine:
            from worker.fake_engine import FakeEngineCore

            return FakeEngineCore(config, step_s=args.fake_step_ms / 1000)
        from headrace.tp_group import start_engine

        engine = start_engine(config, exit_on_failure=True)
        # Structured output's first use imports xgrammar and reads the vocabulary (seconds
        # of GIL-heavy work): done before the worker reports ready, so it never starves the
        # heartbeat thread of a serving worker into looking dead.
        engine.grammars.backend.warm_up()
        return engine

    return build


def worker_main(args: argparse.Namespace) -> int:
    """Build the engine from the flags and serve it until SIGTERM/SIGINT."""
    from worker import progress

    config = worker_config(args)
    progress.enable(args.worker_id or "worker")  # start-up stages on stderr
    server = WorkerServer(
        engine_factory(config, args),
        args.bind,
        worker_id=args.worker_id,
        heartbeat_interval=args.heartbeat_interval,
        gateway_timeout=args.gateway_timeout,
        tokenizer=config.tokenizer,
        max_logprobs=config.max_logprobs,
        admission=admission_from_args(args),
        shutdown_timeout=args.shutdown_timeout,
        health=_health_address(args),
    )
    try:
        server.serve_forever(args.parent_pid)
    except RuntimeError as e:
        if not isinstance(e.__cause__, FatalEngineError):
            raise
        print(f"headrace worker: {e.__cause__}; exiting", file=sys.stderr)
        return 1
    return 0


def _health_address(args: argparse.Namespace) -> tuple[str, int] | None:
    if args.health_port is None:
        return None
    if not 0 < args.health_port < 65536:
        raise ValueError(f"--health-port must be in [1, 65535], got {args.health_port}")
    return (args.health_host, args.health_port)
