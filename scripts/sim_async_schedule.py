"""How a workload's steps schedule with and without async scheduling (CPU, no model).

The engine's own Scheduler and KVCacheManager run the workload with a stub for the model
(every sampled token is id 7; W3 ignores EOS, so only lengths end requests). Sync: each
step is applied before the next is scheduled. Async (worker/async_step.py): each step is
scheduled while the previous one is in flight (placeholders), then the previous one is
applied. Prints the steps, how many were launched while the previous step ran (overlap),
the rows computed for requests already finished (wasted), and preemptions.

    python scripts/sim_async_schedule.py --workload W3 --num-requests 1000
"""

from __future__ import annotations

import argparse
import time

from headrace.bench.offline import make_workload
from ipc.messages import SamplingParams
from worker.config import SchedulerConfig
from worker.kv_cache import KVCacheManager
from worker.request import Request
from worker.scheduler import Scheduler, SchedulerOutput


def simulate(args: argparse.Namespace, asyn: bool) -> dict[str, float]:
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
    prev: SchedulerOutput | None = None
    t0 = time.perf_counter()
    while sched.has_unfinished_requests():
        out = sched.schedule()
        if out.empty:
            assert prev is not None, "nothing schedulable and nothing in flight"
        else:
            steps += 1
            overlapped += asyn and prev is not None
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
    args = p.parse_args()
    for name, asyn in (("sync", False), ("async", True)):
        r = simulate(args, asyn)
        frac = r["overlapped"] / max(r["steps"], 1)
        print(
            f"{args.workload} {name:5s}: {r['steps']} steps, {r['overlapped']} overlapped "
            f"({100 * frac:.1f}%), {r['wasted_rows']} wasted rows, "
            f"{r['preemptions']} preemptions ({r['host_s']:.1f} s of scheduler)"
        )


if __name__ == "__main__":
    main()
