"""`headrace run-batch -i in.jsonl -o out.jsonl`: start one worker process, then run the
batch file's lines through the gateway's serving code (gateway/run_batch.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from gateway.engine_client import EngineClient
from gateway.run_batch import run_batch
from headrace.engine_args import add_engine_args
from headrace.serve import WorkerProcess, serving_engine_config


def add_run_batch_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser, model_required=False)
    g = parser.add_argument_group("run-batch")
    g.add_argument("-i", "--input-file", required=True, help="OpenAI batch file (JSONL)")
    g.add_argument("-o", "--output-file", required=True, help="where results go (JSONL)")
    g.add_argument("--max-concurrency", type=int, default=256, help="lines in flight at once")


def run_batch_main(args: argparse.Namespace) -> int:
    lines = [ln for ln in Path(args.input_file).read_text().splitlines() if ln.strip()]
    config = serving_engine_config(args)
    sock_dir = tempfile.mkdtemp(prefix="headrace-")
    worker = WorkerProcess(0, f"ipc://{sock_dir}/worker-0.sock", config, gpu=False)
    worker.start()

    async def main() -> int:
        client = EngineClient([worker.address], worker_timeout=5.0)
        await client.start()
        try:
            return await run_batch(client, lines, Path(args.output_file), args.max_concurrency)
        finally:
            await client.close()

    try:
        failed = asyncio.run(main())
    finally:
        worker.stop()
    print(f"run-batch: {len(lines) - failed} of {len(lines)} requests succeeded", file=sys.stderr)
    return 0 if failed == 0 else 1
