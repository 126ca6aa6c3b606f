"""`headrace worker`'s flags and main, and `python -m worker.server_cli --config JSON` (how
`headrace serve` starts its workers): everything between the command line and
worker.server.WorkerServer."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from worker.server import DEFAULT_BIND, Engine, WorkerServer

if TYPE_CHECKING:
    from worker.config import EngineConfig


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `headrace worker` beyond the engine's (worker.args.add_engine_args)."""
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


def _engine_factory(config: EngineConfig, args: argparse.Namespace) -> Callable[[], Engine]:
    """EngineCore, or with --fake-engine the model-free benchmarking engine."""

    def build() -> Engine:
        if args.fake_engine:
            from worker.fake_engine import FakeEngineCore

            return FakeEngineCore(config, step_s=args.fake_step_ms / 1000)
        from worker.engine import EngineCore

        return EngineCore(config)

    return build


def worker_main(args: argparse.Namespace) -> None:
    """`headrace worker`: build an EngineCore from the engine flags and serve it."""
    from worker.args import engine_config_from_args

    config = engine_config_from_args(args)

    _make_server(config, args).serve_forever()


def _make_server(config: EngineConfig, args: argparse.Namespace) -> WorkerServer:
    return WorkerServer(
        _engine_factory(config, args),
        args.bind,
        worker_id=args.worker_id,
        heartbeat_interval=args.heartbeat_interval,
        gateway_timeout=args.gateway_timeout,
        tokenizer=config.tokenizer,
        max_logprobs=config.max_logprobs,
        health=_health_address(args),
    )


def _health_address(args: argparse.Namespace) -> tuple[str, int] | None:
    port = getattr(args, "health_port", None)
    if port is None:
        return None
    if not 0 < port < 65536:
        raise ValueError(f"--health-port must be in [1, 65535], got {port}")
    return (args.health_host, port)


def _main_from_config_json(argv: list[str] | None = None) -> None:
    """`python -m worker.server_cli --bind ADDR --config JSON`: how `headrace serve` starts
    its workers (the EngineConfig travels as JSON, not pickled)."""
    import msgspec

    from worker.config import EngineConfig

    parser = argparse.ArgumentParser(prog="python -m worker.server_cli")
    add_worker_args(parser)
    parser.add_argument("--config", required=True, help="EngineConfig as a JSON object")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when it exits")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    config = msgspec.json.decode(args.config.encode(), type=EngineConfig)
    config.validate()

    _make_server(config, args).serve_forever(args.parent_pid)


if __name__ == "__main__":
    _main_from_config_json()
