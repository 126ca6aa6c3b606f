"""`headrace gateway --worker ADDR ... | --workers-file PATH`: the OpenAI HTTP API (gateway/app.py)
served by uvicorn in front of workers."""

from __future__ import annotations

import argparse
import logging

from gateway.app import GatewayConfig, build_app
from gateway.cors import add_cors_args, cors_from_args
from gateway.drain import DEFAULT_SHUTDOWN_TIMEOUT
from gateway.limits import add_limit_args, limits_from_args
from gateway.router import ROUTING_POLICIES
from gateway.tool_calling import ToolOptions
from gateway.tool_parsers import PARSERS
from gateway.workers_file import check_worker_address


def add_gateway_args(parser: argparse.ArgumentParser, with_workers: bool = True) -> None:
    """Flags of `headrace gateway` (and, without --worker, of `headrace serve`)."""
    g = parser.add_argument_group("gateway")
    if with_workers:
        g.add_argument(
            "--worker",
            action="append",
            default=[],
            metavar="ADDR",
            help="a worker's ZeroMQ address (ipc:///path or tcp://host:port); repeat for more",
        )
        g.add_argument(
            "--workers-file",
            default=None,
            metavar="PATH",
            help="more worker addresses, one per line; re-read when it changes (workers that "
            "disappear from it drain, then drop out)",
        )
        g.add_argument("--tokenizer", default=None, help="tokenizer path (default: the worker's)")
    g.add_argument("--host", default="127.0.0.1", help="HTTP host to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    g.add_argument(
        "--api-key", default=None, help="require this Bearer token on /v1/* and /admin/*"
    )
    g.add_argument(
        "--routing",
        default="least-loaded",
        choices=ROUTING_POLICIES,
        help="least-loaded (default); prefix: keep shared prompt prefixes on one worker; "
        "session: one worker per X-Session-ID header or `user` field, the same from every "
        "gateway",
    )
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="answer 429 while this many requests wait for their first token",
    )
    g.add_argument(
        "--worker-timeout",
        type=float,
        default=1.0,
        help="seconds without a heartbeat before a worker counts as down",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        help="on SIGTERM, seconds to let requests in flight finish (new ones get 503)",
    )
    g.add_argument(
        "--tool-call-parser",
        default=None,
        choices=sorted(PARSERS),
        help="how the model writes tool calls (for tool_choice auto)",
    )
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="let the model decide when to call tools (needs --tool-call-parser)",
    )
    g.add_argument(
        "--disable-chat-page",
        action="store_true",
        help="do not serve the built-in chat page at /",
    )
    add_limit_args(g)
    add_cors_args(g)


def gateway_config_from_args(
    args: argparse.Namespace, workers: list[str] | None = None
) -> GatewayConfig:
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    if args.worker_timeout <= 0:
        raise ValueError(f"--worker-timeout must be > 0, got {args.worker_timeout}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    tools = ToolOptions(args.tool_call_parser, args.enable_auto_tool_choice)
    tools.validate()
    workers_file = getattr(args, "workers_file", None)
    if workers is None:
        workers = [check_worker_address(a, "--worker") for a in args.worker]
        if not workers and not workers_file:
            raise ValueError("give at least one --worker ADDR or a --workers-file")
    return GatewayConfig(
        workers=workers,
        workers_file=workers_file,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        routing=args.routing,
        max_queued_requests=args.max_queued_requests,
        worker_timeout=args.worker_timeout,
        tokenizer=getattr(args, "tokenizer", None),
        limits=limits_from_args(args),
        cors=cors_from_args(args),
        shutdown_timeout=args.shutdown_timeout,
        tools=tools,
        chat_page=not args.disable_chat_page,
    )


def run_gateway(config: GatewayConfig, log_level: str = "warning") -> None:
    """Serve the app with uvicorn (uvloop when installed; h11 with a header timeout) until
    SIGINT/SIGTERM, which drains first (gateway/drain.py)."""
    import uvicorn

    from gateway.drain import DrainingServer
    from gateway.limits import HeaderTimeoutH11

    log_level = log_level.lower()
    logging.getLogger("headrace").setLevel(log_level.upper())
    app = build_app(config)
    limits = config.limits
    protocol = type(
        "Protocol", (HeaderTimeoutH11,), {"header_timeout": limits.request_header_timeout}
    )
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        loop="auto",
        http=protocol,
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=limits.timeout_keep_alive,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=limits.h11_max_incomplete_event_size,
        timeout_graceful_shutdown=1,  # after our own drain (DrainingServer)
    )
    DrainingServer(uv_config, app.state.drain, config.shutdown_timeout).run()


def gateway_main(args: argparse.Namespace) -> int:
    """`headrace gateway --worker ADDR [--worker ADDR ...]`."""
    run_gateway(gateway_config_from_args(args), getattr(args, "log_level", "warning"))
    return 0
