"""Profile W2's prefill-heavy mixed steps on the GPU: where an eager step of decode rows
plus prompt chunks spends its kernel time.

    PYTHONPATH=. python scripts/profile_mixed.py --quantization fp8 --kv-cache-dtype fp8 \
        --decode 540 --context 1500 --prompt 1000 --new 16 --out $OUT/profile_mixed.json

W2's 1000-request FP8 run spends ~29% of its time in 68 mixed steps of ~16k tokens
(~540 decode rows at ~1.5k context beside ~15 prompts of 1,000 tokens; BENCHMARKS.md session
9). This runs `--decode` requests into decode (dummy Llama-3-8B-shaped weights), then
`--steps` times adds `--new` requests of `--prompt` tokens (one output token each) and runs
the one step that prefills them beside the decode rows, under the torch profiler. It prints
per step the rows and tokens, the wall and GPU kernel time, and the top kernels, so the
kernel time can be set against the step's floor (its GEMM FLOPs at the FP8 rate, the
decode rows' KV at copy bandwidth, the prompts' attention).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from headrace.tp_group import start_engine
from ipc.messages import EngineRequest, SamplingParams
from worker.config import EngineConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="scripts/configs/llama-3-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--decode", type=int, default=540)
    p.add_argument("--context", type=int, default=1500)
    p.add_argument("--prompt", type=int, default=1000)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quantization", default=None, choices=["fp8"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"])
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--device", default="auto", help="cpu: a dry run of the script (tiny model)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    engine = start_engine(
        EngineConfig(
            model=args.model,
            load_format=args.load_format,
            max_num_seqs=args.decode + args.new * (args.steps + 1),
            quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
            max_num_batched_tokens=args.max_num_batched_tokens,
            device=args.device,
            max_model_len=args.max_model_len,
        )
    )
    on_gpu = engine.device.type == "cuda"
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size

    def add(name: str, n: int, length: int, max_tokens: int) -> None:
        for i in range(n):
            prompt = [rng.randrange(10, min(120000, vocab)) for _ in range(length)]
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            error = engine.add_request(EngineRequest(f"{name}{i}", prompt, params))
            assert error is None, error

    add("d", args.decode, args.context, engine.max_model_len - args.context - 1)
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running
    ):
        engine.step()
    for _ in range(5):
        engine.step()
    if on_gpu:
        torch.cuda.synchronize()

    from torch.profiler import ProfilerActivity, profile

    steps = []
    kernels: dict[str, float] = {}
    for s in range(args.steps + 1):  # the first is a warm-up of the mixed shapes
        add(f"p{s}_", args.new, args.prompt, 1)
        acts = [ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
        with profile(activities=acts, acc_events=True) as prof:
            t0 = time.perf_counter()
            # Until the new prompts are computed: one step when the budget holds them all.
            n = 0
            while any(
                r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.waiting
            ) or any(
                r.request_id.startswith(f"p{s}_") and r.num_computed_tokens < r.num_prompt_tokens
                for r in engine.scheduler.running
            ):
                engine.step()
                n += 1
            if on_gpu:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        if s == 0:
            continue
        avg = prof.key_averages()
        gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in avg) if on_gpu else 0.0
        for e in avg:
            t = getattr(e, "self_device_time_total", 0) if on_gpu else e.self_cpu_time_total
            if t:
                kernels[e.key] = kernels.get(e.key, 0.0) + t / args.steps
        steps.append({"engine_steps": n, "wall_ms": wall * 1e3, "gpu_ms": gpu_us / 1e3})
        print(
            f"mixed step {s}: {n} engine step(s), wall {wall * 1e3:.1f} ms, kernels {gpu_us / 1e3:.1f} ms",
            flush=True,
        )
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    total = sum(kernels.values())
    print(f"kernels per mixed step (ms, of {total / 1e3:.1f}):")
    for name, us in top:
        print(f"{us / 1e3:9.3f} {100 * us / total:5.1f}%  {name[:150]}")
    report = {
        "card": torch.cuda.get_device_name() if on_gpu else "cpu",
        "args": vars(args),
        "steps": steps,
        "kernels_us_per_step": dict(top),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
