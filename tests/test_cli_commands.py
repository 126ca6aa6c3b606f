"""The `headrace` command table: every subcommand parses, and a missing group of packages
disables only the commands that need it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from headrace.cli import build_parser

# command -> (a command line for it, the main it must run)
COMMANDS = {
    "generate": ("generate --model m --prompt hi", "headrace.generate_cmd.generate_main"),
    "worker": ("worker", "headrace.worker_cmd.worker_main"),
    "serve": ("serve", "headrace.serve.serve_main"),
    "gateway": ("gateway --worker tcp://127.0.0.1:5555", "headrace.gateway_cmd.gateway_main"),
    "run-batch": (
        "run-batch -i in.jsonl -o out.jsonl --model m",
        "headrace.run_batch_cmd.run_batch_main",
    ),
    "bench latency": ("bench latency --model m", "headrace.bench.offline.latency_main"),
    "bench throughput": ("bench throughput --model m", "headrace.bench.offline.throughput_main"),
    "bench structured": (
        "bench structured --model m",
        "headrace.bench.structured.structured_main",
    ),
    "bench serve": ("bench serve", "headrace.bench.serve.bench_serve_main"),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_runs_its_own_main(name: str) -> None:
    argv, main = COMMANDS[name]
    func = build_parser().parse_args(argv.split()).func
    assert f"{func.__module__}.{func.__name__}" == main


@pytest.mark.process
def test_without_the_gateway_packages_only_server_commands_are_off() -> None:
    code = """
import sys
sys.modules["starlette"] = None  # import starlette -> ImportError
from headrace.cli import build_parser
p = build_parser()
for argv in (["serve"], ["gateway"], ["generate", "--model", "m", "--prompt", "x"],
             ["bench", "latency", "--model", "m"]):
    func = p.parse_args(argv).func
    print(argv[0], func.__name__)
try:
    p.parse_args(["serve"]).func(None)
except ValueError as e:
    print(e)
"""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:4] == ["serve run", "gateway run", "generate generate_main", "bench latency_main"]
    assert lines[4].startswith("serve is unavailable: No module named 'starlette")
