"""The scheduler's CPU time per decode step at large batches (no model, no torch).

The engine's Scheduler and KVCacheManager with stub tokens (every sampled token is id 7):
`--batch` requests are prefilled, then timed over `--steps` async decode steps (schedule,
advance, resolve: what the engine's loop runs per step) and sync ones (schedule, update).
Prints CPU milliseconds per step and microseconds per running request.

    python scripts/bench_scheduler.py --batch 256 512 1024
"""

from __future__ import annotations

import argparse
import time

from ipc.messages import SamplingParams
from worker.config import SchedulerConfig
from worker.kv_cache import KVCacheManager
from worker.request import Request
from worker.scheduler import Scheduler


def decoding_scheduler(batch: int, prompt_len: int, caching: bool) -> Scheduler:
    """A scheduler with `batch` requests running, their prompts computed."""
    blocks = batch * (-(-(prompt_len + 1200) // 16)) + 16
    kv = KVCacheManager(blocks, 16, enable_caching=caching)
    config = SchedulerConfig(
        max_num_seqs=batch, max_num_batched_tokens=max(16384, batch), max_model_len=4096
    )
    sched = Scheduler(config, kv)
    for i in range(batch):
        params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
        prompt = [1 + (i * 7 + j) % 30000 for j in range(prompt_len)]
        sched.add_request(Request(f"r{i}", prompt, params, frozenset()))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.requests.values()):
        out = sched.schedule()
        sched.update(out, [[7] if sr.samples else [] for sr in out.scheduled])
    return sched


def time_steps(sched: Scheduler, steps: int, asyn: bool) -> float:
    """CPU seconds per decode step (process time: the development machine is shared, and
    wall time there counts other processes' turns)."""
    prev = None
    t0 = time.process_time()
    for _ in range(steps):
        out = sched.schedule()
        if not asyn:
            sched.update(out, [[7] for _ in out.scheduled])
            continue
        sched.advance(out)
        if prev is not None:
            sched.resolve(prev, [[7] for _ in prev.scheduled])
        prev = out
    return (time.process_time() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--no-prefix-caching", action="store_true")
    args = p.parse_args()
    for batch in args.batch:
        for asyn in (False, True):
            sched = decoding_scheduler(batch, args.prompt_len, not args.no_prefix_caching)
            s = time_steps(sched, args.steps, asyn)
            assert len(sched.running) == batch
            print(
                f"batch {batch:5d} {'async' if asyn else 'sync ':5s}: {s * 1e3:7.2f} ms per step, "
                f"{s * 1e6 / batch:5.2f} us per request",
                flush=True,
            )


if __name__ == "__main__":
    main()
