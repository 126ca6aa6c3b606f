"""The step timeline of `--batch` requests of `--context` prompt tokens (dummy Llama-3-8B
shape by default): prefill, then `--steps` decode steps; per step kind the host's ms by
phase, GPU busy ms and the idle gap (worker/step_timeline.py).

    PYTHONPATH=. python scripts/timeline_step.py --batch 256 --context 1024 --out t.json

Only the oldest engine API (EngineCore, add_request, step), so an older checkout runs it
too with worker/step_timeline.py and this file copied in (scripts/gpu_bench.sh hostpath
does so for $HEADRACE_BASE_TREE): old and new timelines side by side in one call.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from ipc.messages import EngineRequest, SamplingParams
from worker.config import EngineConfig
from worker.engine import EngineCore
from worker.step_timeline import StepTimeline, format_summary


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="scripts/configs/llama-3-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    engine = EngineCore(
        EngineConfig(model=args.model, load_format=args.load_format, max_num_seqs=args.batch)
    )
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)
    warm = [rng.randrange(10, vocab) for _ in range(16)]
    engine.add_request(EngineRequest("warm", warm, SamplingParams(max_tokens=8, ignore_eos=True)))
    while engine.has_unfinished_requests():  # compile and warm every path once
        engine.step()
    timeline = StepTimeline(engine).attach()
    for i in range(args.batch):
        prompt = [rng.randrange(10, vocab) for _ in range(args.context)]
        engine.add_request(EngineRequest(f"r{i}", prompt, params))
    for _ in range(args.steps):
        engine.step()
    timeline.detach()
    summary = timeline.summary()
    print(f"step timeline, batch {args.batch}, context {args.context}:")
    print(format_summary(summary), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch": args.batch, "context": args.context, "timeline": summary}, f)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
