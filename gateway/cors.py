"""CORS, with vLLM's flags: `--allowed-origins`, `--allowed-methods`, `--allowed-headers`
(JSON lists) and `--allow-credentials`. Off unless an origin is allowed, so a browser page
on another origin cannot call the API by default."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware


@dataclass(frozen=True)
class CorsConfig:
    allowed_origins: list[str] = field(default_factory=list)  # ["*"] allows any origin
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False


def _parse_list(value: str) -> list[str]:
    try:
        items = json.loads(value)
    except json.JSONDecodeError:
        items = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
    return items


def add_cors_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--allowed-origins",
        type=_parse_list,
        default=[],
        help="CORS origins, a JSON list such as '[\"https://ui.example\"]' or '[\"*\"]' (default: none)",
    )
    g.add_argument("--allowed-methods", type=_parse_list, default=["*"], help="CORS methods")
    g.add_argument("--allowed-headers", type=_parse_list, default=["*"], help="CORS headers")
    g.add_argument(
        "--allow-credentials", action="store_true", help="CORS: allow cookies / auth headers"
    )


def cors_from_args(args: argparse.Namespace) -> CorsConfig:
    return CorsConfig(
        allowed_origins=list(args.allowed_origins),
        allowed_methods=list(args.allowed_methods),
        allowed_headers=list(args.allowed_headers),
        allow_credentials=bool(args.allow_credentials),
    )


def add_cors(app: Starlette, cors: CorsConfig) -> None:
    if not cors.allowed_origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=cors.allowed_origins,
        allow_methods=cors.allowed_methods,
        allow_headers=cors.allowed_headers,
        allow_credentials=cors.allow_credentials,
    )
