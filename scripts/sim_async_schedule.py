"""How a workload's steps schedule with and without async scheduling (CPU, no model).

The engine's own Scheduler and KVCacheManager run the workload with a stub for the model
(every sampled token is id 7; W3 ignores EOS, so only lengths end requests). Sync: each
step is applied before the next is scheduled. Async (worker/async_step.py): each step is
scheduled while the previous one is in flight (placeholders), then the previous one is
applied. Prints the steps, how many were launched while the previous step ran (overlap),
the rows computed for requests already finished (wasted), and preemptions.

    python scripts/sim_async_schedule.py --workload W3 --num-requests 1000
    python scripts/sim_async_schedule.py --workload W2 --max-num-seqs 1024 \
        --max-num-batched-tokens 16384 --num-blocks 55408 --cost bf16 --admission both

`--cost bf16|fp8` adds a roofline estimate of each step's GPU time on an H200 for the
Llama-3-8B shape (scripts/step_cost.py: GEMMs at a TFLOP/s rate or the weight read, the
decode rows' KV bytes at a fraction of copy bandwidth, prefill attention FLOPs, a fixed
cost per step) and prints the estimated output tok/s, so admission policies can be compared
before a GPU run. `--admission both` runs the default and HEADRACE_ADMISSION=reserve.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from headrace.bench.offline import make_workload
from ipc.messages import SamplingParams
from scripts.step_cost import COSTS, StepCost
from worker.config import SchedulerConfig
from worker.kv_cache import KVCacheManager
from worker.request import Request
from worker.scheduler import Scheduler, SchedulerOutput


def simulate(
    args: argparse.Namespace,
    asyn: bool,
    cost: StepCost | None = None,
    on_step: Callable[[SchedulerOutput], None] | None = None,
) -> dict[str, float]:
    """`on_step` sees every non-empty step as scheduled, before it is applied (its rows'
    `start` is the KV length before the step; scripts/w3_step_shapes.py records them)."""
    w = make_workload(args.workload, args.num_requests, args.seed)
    kv = KVCacheManager(args.num_blocks, args.block_size, enable_caching=False)
    config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_chunked_prefill=True,
    )
    sched = Scheduler(config, kv)
    for i, (p, o) in enumerate(zip(w.prompt_lens, w.output_lens, strict=True)):
        params = SamplingParams(temperature=0, max_tokens=o, ignore_eos=True)
        sched.add_request(
            Request(f"r{i}", [1 + (i + j) % 500 for j in range(p)], params, frozenset())
        )
    steps = overlapped = wasted = 0
    gpu_s = 0.0
    prev: SchedulerOutput | None = None
    t0 = time.perf_counter()
    while sched.has_unfinished_requests():
        out = sched.schedule()
        if out.empty:
            assert prev is not None, "nothing schedulable and nothing in flight"
        else:
            steps += 1
            overlapped += asyn and prev is not None
            if on_step is not None:
                on_step(out)
            if cost is not None:
                gpu_s += cost.step_seconds(out)
        if not asyn:
            sched.update(out, [[7] if sr.samples else [] for sr in out.scheduled])
            continue
        if not out.empty:
            sched.advance(out)
        if prev is not None:
            sched.resolve(prev, [[7] if sr.samples else [] for sr in prev.scheduled])
            # Rows of the step just launched whose request `prev` finished: wasted.
            wasted += sum(sr.request.is_finished for sr in out.scheduled)
        prev = None if out.empty else out
    return {
        "steps": steps,
        "overlapped": overlapped,
        "wasted_rows": wasted,
        "preemptions": sched.num_preemptions,
        "host_s": time.perf_counter() - t0,
        "gpu_s": gpu_s,
        "output_tokens": sum(w.output_lens),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="W3")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=40_000, help="H200, 8B bf16: ~45k")
    p.add_argument("--cost", choices=sorted(COSTS), help="estimate GPU time (H200, 8B shape)")
    p.add_argument(
        "--admission",
        choices=["default", "reserve", "both"],
        default="default",
        help="reserve: HEADRACE_ADMISSION=reserve (worker/kv_reserve.py)",
    )
    p.add_argument("--sync-only", action="store_true", help="skip the async schedule")
    args = p.parse_args()
    cost = COSTS[args.cost] if args.cost else None
    policies = ["default", "reserve"] if args.admission == "both" else [args.admission]
    modes = [("sync", False)] + ([] if args.sync_only else [("async", True)])
    for policy in policies:
        os.environ["HEADRACE_ADMISSION"] = "reserve" if policy == "reserve" else ""
        for name, asyn in modes:
            r = simulate(args, asyn, cost)
            frac = r["overlapped"] / max(r["steps"], 1)
            line = (
                f"{args.workload} {policy} {name:5s}: {r['steps']} steps, {r['overlapped']} "
                f"overlapped ({100 * frac:.1f}%), {r['wasted_rows']} wasted rows, "
                f"{r['preemptions']} preemptions ({r['host_s']:.1f} s of scheduler)"
            )
            if cost is not None:
                tps = r["output_tokens"] / r["gpu_s"]
                line += f"; est. GPU {r['gpu_s']:.1f} s, {tps:,.0f} output tok/s"
            print(line)


if __name__ == "__main__":
    main()
