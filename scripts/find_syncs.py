"""Where the host waits for the GPU during an offline run: torch's sync debug mode on, each
synchronizing call counted by the Python stack that made it.

Under async scheduling the host should wait once a step (reading the tokens of the step in
flight). W2's mixed steps showed a 6-8 ms mean GPU gap and ~140 ms a step of host time in
the sampling phase (BENCHMARKS.md session 12), as if the host waited for the step it had
just launched. This runs a W2-shaped workload (dummy Llama-3-8B weights), turns
`torch.cuda.set_sync_debug_mode("warn")` on after `--warmup` steps and prints every distinct
stack (the repo's frames) that synchronized, with its count and the step kinds it hit.

    PYTHONPATH=. python scripts/find_syncs.py --quantization fp8 --kv-cache-dtype fp8 \
        --num-requests 300 --out $OUT/syncs.json
    PYTHONPATH=. python scripts/find_syncs.py --device cpu --model ../shared/models/stories260K \
        --num-requests 3 --prompt 20 --output 4   # a dry run
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import random
import traceback
import warnings
from pathlib import Path
from typing import Any, TextIO

import torch
from torch.profiler import ProfilerActivity, profile

from headrace.tp_group import start_engine
from ipc.messages import EngineRequest, SamplingParams
from worker.config import EngineConfig

REPO = str(Path(__file__).resolve().parent.parent)


def repo_stack() -> tuple[str, ...]:
    frames = traceback.extract_stack()[:-2]
    return tuple(
        f"{f.filename[len(REPO) + 1 :]}:{f.lineno} {f.name}"
        for f in frames
        if f.filename.startswith(REPO) and "find_syncs" not in f.filename
    )[-8:]


def report_profile(prof: Any, out: str | None) -> None:
    """The profiled steps' host time by op (a launch that blocks shows as a long
    cudaLaunchKernel / cuLaunchKernelEx) and, with --out, their trace beside it."""
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if out:
        trace = Path(out).with_suffix(".trace.json")
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
            g.write(f.read())
        trace.unlink()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="scripts/configs/llama-3-8b")
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--prompt", type=int, default=1000)
    p.add_argument("--output", type=int, default=200)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quantization", default=None, choices=["fp8"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"])
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many steps (CPU and CUDA) from the first mixed step after warm-up",
    )
    p.add_argument("--device", default="auto", help="cpu: a dry run of the script")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    engine = start_engine(
        EngineConfig(
            model=args.model,
            load_format="dummy",
            quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
            max_model_len=args.max_model_len,
            device=args.device,
        )
    )
    cuda = engine.device.type == "cuda"
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True)
    for i in range(args.num_requests):
        prompt = [rng.randrange(vocab) for _ in range(args.prompt)]
        engine.add_request(EngineRequest(f"s{i}", prompt, params))

    hits: collections.Counter[tuple[str, ...]] = collections.Counter()
    kinds: dict[tuple[str, ...], collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    kind = "warmup"

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:  # fmt: skip
        stack = repo_stack() + (str(message)[:80],)
        hits[stack] += 1
        kinds[stack][kind] += 1

    def prefill_pending() -> bool:
        s = engine.scheduler
        return any(r.num_computed_tokens < r.num_prompt_tokens for r in [*s.waiting, *s.running])

    steps = collections.Counter[str]()
    prof: Any = None
    profiled = 0

    def alloc_retries() -> int:
        return int(torch.cuda.memory_stats().get("num_alloc_retries", 0)) if cuda else 0

    retries0 = alloc_retries()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        while engine.has_unfinished_requests():
            if steps.total() == args.warmup and cuda:
                torch.cuda.set_sync_debug_mode("warn")
            kind = (
                "warmup"
                if steps.total() < args.warmup
                else ("mixed" if prefill_pending() else "decode")
            )
            steps[kind] += 1
            if kind == "mixed" and prof is None and profiled < args.profile_steps:
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                prof = profile(activities=acts, record_shapes=True)
                prof.__enter__()
            engine.step()
            if prof is not None:
                profiled += 1
                if profiled == args.profile_steps:
                    prof.__exit__(None, None, None)
                    report_profile(prof, args.out)
                    prof = None
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    retries = alloc_retries() - retries0
    rows = [{"count": n, "kinds": dict(kinds[s]), "stack": list(s)} for s, n in hits.most_common()]
    print(f"steps {dict(steps)}; {sum(hits.values())} synchronizing calls at {len(rows)} stacks;")
    print(f"caching-allocator retries (cudaFree + retry, a device sync each): {retries}")
    for s, n in hits.most_common(20):
        print(f"--- {n} x  {dict(kinds[s])}")
        for frame in s:
            print("   ", frame)
    if args.out:
        report = {"steps": dict(steps), "alloc_retries": retries, "stacks": rows}
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
