"""Profile engine steps on the GPU: kernel time per step, launch gaps, CPU time per phase.

    PYTHONPATH=. python scripts/profile_step.py --batch 1 --context 128 --out $OUT/profile_b1.json

Runs decode steps of `--batch` requests (dummy Llama-3-8B-shaped weights by default) and
reports, per step: wall time, GPU kernel time (sum of kernel durations from the torch
profiler), number of kernels, and the CPU time of schedule / build inputs / model + sample
/ postprocess; and the step timeline (worker/step_timeline.py) of the prefill and warm-up
steps and of `--steps` decode steps: per step kind, host time by phase, GPU busy time
between CUDA events, and the idle gap between steps. The top kernels by total time go to the JSON file. With
`--tensor-parallel-size N` the leader's steps are profiled (its followers run the same),
and `allreduce_ms_per_step` is the NCCL kernels' share (eager: `--enforce-eager` names
every kernel; in a CUDA graph the profiler may see only the graph).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict

import torch

from headrace.tp_group import start_engine
from ipc.messages import EngineRequest, SamplingParams
from worker.config import EngineConfig
from worker.step_timeline import StepTimeline, format_summary


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="scripts/configs/llama-3-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--quantization", default=None, choices=["fp8"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"])
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("--device", default="auto", help="cpu: a dry run of the script (tiny model)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    engine = start_engine(
        EngineConfig(
            model=args.model,
            load_format=args.load_format,
            max_num_seqs=max(args.batch, 1),
            enforce_eager=args.enforce_eager,
            quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            device=args.device,
            max_model_len=args.max_model_len,
        )
    )
    on_gpu = engine.device.type == "cuda"

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    for i in range(args.batch):
        prompt = [rng.randrange(10, min(120000, vocab)) for _ in range(args.context)]
        max_tokens = engine.max_model_len - args.context - 1
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        error = engine.add_request(EngineRequest(f"r{i}", prompt, params))
        assert error is None, error
    # Prefill, then a few decode steps to warm up (their timeline: prefill and mixed steps).
    warm = StepTimeline(engine).attach()
    while any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()
    for _ in range(5):
        engine.step()
    warm.detach()
    sync()
    decode = StepTimeline(engine).attach()
    for _ in range(args.steps):
        engine.step()
    decode.detach()
    timeline = {"prefill_and_warmup": warm.summary(), "decode": decode.summary()}

    phases: dict[str, float] = defaultdict(float)
    graphs = engine.runner.graph_runner
    replays_before = sum(graphs.replays.values()) if graphs is not None else 0
    t_all = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        sched = engine.scheduler.schedule()
        t1 = time.perf_counter()
        result = engine.runner.execute(sched)  # includes the token sync
        t2 = time.perf_counter()
        engine._postprocess(sched, result)
        t3 = time.perf_counter()
        phases["schedule_ms"] += (t1 - t0) * 1000
        phases["execute_ms"] += (t2 - t1) * 1000
        phases["postprocess_ms"] += (t3 - t2) * 1000
    wall_ms = (time.perf_counter() - t_all) * 1000 / args.steps
    # How many of the timed steps replayed a CUDA graph (the rest ran eagerly).
    replayed = (sum(graphs.replays.values()) if graphs is not None else 0) - replays_before
    phases = {k: v / args.steps for k, v in phases.items()}

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(args.steps):
            engine.step()
        sync()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
    cuda_us = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    nccl_us = sum(
        getattr(e, "self_device_time_total", 0)
        for e in prof.key_averages()
        if "nccl" in e.key.lower()
    )
    report = {
        "card": torch.cuda.get_device_name() if on_gpu else "cpu",
        "batch": args.batch,
        "context": args.context,
        "graphs": engine.runner.graph_runner is not None,
        "graph_replayed_steps": f"{replayed} of {args.steps}",
        "wall_ms_per_step": wall_ms,
        "cpu_phases_ms_per_step": phases,
        "gpu_ms_per_step": cuda_us / 1000 / args.steps,
        "tensor_parallel_size": args.tensor_parallel_size,
        "allreduce_ms_per_step": nccl_us / 1000 / args.steps,
        "table": table,
        "timeline": timeline,
    }
    for what, summary in timeline.items():
        print(f"step timeline, {what}:\n{format_summary(summary)}")
    print(json.dumps({k: v for k, v in report.items() if k not in ("table", "timeline")}, indent=1))
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
