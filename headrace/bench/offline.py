"""Offline benchmarks: W1 (batch-1 latency), W2 and W3 (throughput), with baselines.

Baselines in the same run (BENCH.md): the measured copy-bandwidth roofline, and Hugging
Face transformers' `generate()` with static batches (`--hf-requests N`, 0 to skip;
headrace/bench/hf_baseline.py). The engine's summary line and JSON are written before the
HF baseline starts (and the engine is shut down, freeing its GPU memory), then rewritten
with the HF fields.
Requests are seeded random token ids; generation ignores EOS, so every request produces
exactly its output length.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from headrace.engine_args import add_engine_args, engine_config_from_args
from ipc.messages import EngineRequest, GuidedDecoding, SamplingParams
from worker.config import EngineConfig
from worker.step_timeline import StepTimeline, format_summary


@dataclass
class Workload:
    name: str
    prompt_lens: list[int]  # including the shared prefix
    output_lens: list[int]
    shared_prefix_len: int = 0  # leading tokens every prompt shares (W5)


def make_workload(name: str, num_requests: int | None, seed: int) -> Workload:
    rng = random.Random(seed)
    if name == "W1":
        n = num_requests or 1
        return Workload(name, [128] * n, [256] * n)
    if name == "W2":
        n = num_requests or 1000
        return Workload(name, [1000] * n, [1000] * n)
    if name == "W3":
        n = num_requests or 1000
        return Workload(
            name,
            [rng.randint(64, 2048) for _ in range(n)],
            [rng.randint(16, 512) for _ in range(n)],
        )
    if name == "W5":
        n = num_requests or 200
        return Workload(name, [2100] * n, [64] * n, shared_prefix_len=2000)
    raise ValueError(f"workload must be W1, W2, W3 or W5, got {name!r}")


def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, model_required=False)
    p.set_defaults(model="scripts/configs/llama-3-8b", load_format="dummy")
    p.add_argument(
        "--workload",
        default=None,
        help="W1 (latency default), W2, W3 (throughput default) or W5 (shared prefix)",
    )
    p.add_argument(
        "--num-requests", type=int, default=None, help="fewer requests than the workload's"
    )
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument(
        "--hf-requests", type=int, default=0, help="HF generate() baseline on this many requests"
    )
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument(
        "--hf-time-limit",
        type=float,
        default=120.0,
        help="seconds for the HF baseline's batches (a batch is cut short at the limit)",
    )
    p.add_argument("--no-roofline", action="store_true")
    p.add_argument(
        "--profile",
        action="store_true",
        help="print a step timeline of the run: per step kind, host time by phase, GPU busy "
        "time and the idle gap between steps (worker/step_timeline.py)",
    )
    p.add_argument("--output-json", default=None)


def _token_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, min(vocab, 128000)) for _ in range(n)]


def run_engine(
    engine: Any, w: Workload, seed: int, progress: bool, guided: GuidedDecoding | None = None
) -> dict[str, Any]:
    """Submit all requests at once, step to completion; per-request token timestamps.
    With `guided`, every request follows that grammar (bench structured)."""
    from tqdm import tqdm

    rng = random.Random(seed + 1)
    vocab = engine.model_config.vocab_size
    prefix = _token_ids(rng, w.shared_prefix_len, vocab)
    prompts = [prefix + _token_ids(rng, n - len(prefix), vocab) for n in w.prompt_lens]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    for i, (prompt, out_len) in enumerate(zip(prompts, w.output_lens, strict=True)):
        params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True, guided=guided)
        engine.add_request(EngineRequest(f"b{i}", prompt, params, arrival_time=t0))
    bar = tqdm(total=len(prompts), desc=w.name, unit="req", disable=not progress)
    steps = 0
    preempted0 = _preemptions(engine)
    tiled0 = _prefill_tile_steps(engine)
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        now = time.perf_counter()
        for o in outs:
            if o.new_token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                counts[o.request_id] = counts.get(o.request_id, 0) + len(o.new_token_ids)
            if o.finish_reason is not None:
                bar.update(1)
    elapsed = time.perf_counter() - t0
    bar.close()
    out_tokens = sum(counts.values())
    assert out_tokens == sum(w.output_lens), "every request must produce its output length"
    ttft = sorted(first[k] - t0 for k in first)
    tpot = [(last[k] - first[k]) / (counts[k] - 1) for k in counts if counts[k] > 1]
    return {
        "elapsed_s": elapsed,
        "steps": steps,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(w.prompt_lens),
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + sum(w.prompt_lens)) / elapsed,
        "ttft_p50_s": ttft[len(ttft) // 2] if ttft else None,
        "tpot_mean_ms": 1000 * sum(tpot) / len(tpot) if tpot else None,
        "preemptions": _preemptions(engine) - preempted0,
        # Eager steps that ran prefill round 2's flat grid (HEADRACE_PREFILL_GRID=flat).
        "prefill_tile_steps": _prefill_tile_steps(engine) - tiled0,
    }


def _prefill_tile_steps(engine: Any) -> int:
    return int(getattr(getattr(engine, "runner", None), "prefill_tile_steps", 0))


def _preemptions(engine: Any) -> int:
    sched = getattr(engine, "scheduler", None)
    return int(getattr(sched, "num_preemptions", 0))


def measure_copy_bandwidth() -> float:
    """Bytes read plus written per second for a 2 GiB device-to-device copy."""
    import torch

    n = 1 << 30  # 2 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    reps = 10
    for _ in range(reps):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    secs = start.elapsed_time(end) / 1000 / reps
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 / secs


NOMINAL_BANDWIDTH = 4.25e12  # B/s: the H200 decode floors' bandwidth in the issues


def decode_weight_bytes(model: Any, batch: int) -> float:
    """Weight bytes one decode step of `batch` tokens reads, as stored (FP8 layers 1 byte
    per weight plus their scales). Mixtures of experts read only the experts the tokens
    are routed to: k/E of the expert bytes for one token; for more, the expected share
    touched if every token picked its experts independently."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    experts, share = model.expert_param_bytes()
    touched = 1.0 - (1.0 - share) ** batch if experts else 1.0
    return total - experts * (1.0 - touched)


def roofline(engine: Any, bandwidth: float, context: int, batch: int = 1) -> dict[str, Any]:
    """Decode floor: the weights a step reads plus its KV read, at the measured bandwidth.

    Bytes as stored: with --quantization fp8 the FP8 layers count 1 byte per weight (plus
    their scales; the lm_head and embeddings stay 16-bit), so this is the FP8 floor; with
    awq / gptq the 4-bit layers count 0.5 byte per weight plus their fp16 scales and uint8
    zero points per group (the int4 floor); with --kv-cache-dtype fp8 the KV counts 1 byte
    per element. `floor_ms_per_step_at_nominal` is the same bytes at NOMINAL_BANDWIDTH
    (the target the issues state their fractions against). Tensor parallel: the leader's
    shard and KV heads, the bytes each GPU reads while the others read theirs.
    """
    import torch

    from worker.quant.int4_linear import int4_layers

    model = engine.runner.model
    weight_bytes = decode_weight_bytes(model, batch)
    fp8_bytes = sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
    int4 = int4_layers(model)
    int4_bytes = sum(p.numel() * p.element_size() for m in int4 for p in m.parameters())
    weights = str(engine.dtype).removeprefix("torch.")
    if fp8_bytes:
        weights = "fp8"
    elif int4:
        weights = f"int4 {int4[0].cfg.method}"
    mc = engine.runner.config  # tensor parallel: this rank's KV heads
    elem = torch.tensor([], dtype=engine.kv_dtype).element_size()
    kv_bytes = batch * context * 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * elem
    floor_s = (weight_bytes + kv_bytes) / bandwidth
    return {
        "bandwidth_TBps": bandwidth / 1e12,
        "weight_GB": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9,
        "weight_GB_read_per_step": weight_bytes / 1e9,
        "fp8_weight_GB": fp8_bytes / 1e9,
        "int4_layer_GB": int4_bytes / 1e9,  # packed weights + scales + zeros of 4-bit layers
        "weights": weights,
        "kv_cache_dtype": str(engine.kv_dtype).removeprefix("torch."),
        "floor_ms_per_step": floor_s * 1000,
        "floor_tok_s": batch / floor_s,
        "floor_ms_per_step_at_nominal": (weight_bytes + kv_bytes) / NOMINAL_BANDWIDTH * 1000,
    }


def _card() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name()


def _commit() -> str:
    if os.environ.get("HEADRACE_COMMIT"):
        return os.environ["HEADRACE_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def _main(args: argparse.Namespace, default_workload: str) -> int:
    """The engine's run, its summary line and JSON written at once; then, with
    --hf-requests, the HF baseline, whose failure (OOM, an exception) is recorded in the
    JSON as hf_generate.error without losing the engine's result (still exit 0)."""
    w = make_workload(args.workload or default_workload, args.num_requests, args.workload_seed)
    if w.name == "W1" and args.max_num_seqs is None:
        args.max_num_seqs = 1  # one request: capture only the batch-1 graph
    config = engine_config_from_args(args, usage_context="offline")
    result: dict[str, Any] = {
        "workload": w.name,
        "requests": len(w.prompt_lens),
        "card": _card(),
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "config": {k: v for k, v in asdict(config).items() if k != "extra"},
        # The HEADRACE_* switches (kernel choices, grids) the run was started with.
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("HEADRACE_")},
    }
    _bench_engine(args, config, w, result)
    _write_json(args.output_json, result)
    print(summary_line(result), flush=True)
    if args.hf_requests:
        result["hf_generate"] = _hf_or_error(args, w)
        hf_rate = result["hf_generate"].get("useful_output_tok_s")
        if hf_rate:
            result["speedup_vs_hf"] = result["headrace"][-1]["output_tok_s"] / hf_rate
        _write_json(args.output_json, result)
        print(summary_line(result), flush=True)
    return 0


def _bench_engine(
    args: argparse.Namespace, config: EngineConfig, w: Workload, result: dict[str, Any]
) -> None:
    """Start the engine, warm it up, run the workload (twice for W1), its floor; then shut
    it down, so its GPU memory is free for whatever runs next (the HF baseline)."""
    import torch

    from headrace.tp_group import start_engine

    t = time.perf_counter()
    with start_engine(config) as engine:
        result["startup_s"] = time.perf_counter() - t
        result["num_kv_blocks"] = engine.kv.num_blocks
        # The limits it ran with (the device's defaults where no flag gave them).
        result["max_num_seqs"] = engine.config.max_num_seqs
        result["max_num_batched_tokens"] = engine.config.max_num_batched_tokens
        # Warm-up: one short request through every path (prefill, decode, graphs).
        run_engine(engine, Workload("warmup", [64], [16]), args.workload_seed, progress=False)
        timeline = StepTimeline(engine).attach() if getattr(args, "profile", False) else None
        runs = [
            run_engine(engine, w, args.workload_seed, progress=True)
            for _ in range(2 if w.name == "W1" else 1)
        ]
        result["headrace"] = runs
        if timeline is not None:
            timeline.detach()
            result["timeline"] = timeline.summary()
            result["timeline_worst_gaps"] = timeline.worst_gaps()
            print(format_summary(result["timeline"]), flush=True)
            print("longest idle gaps:", json.dumps(result["timeline_worst_gaps"]), flush=True)
        if torch.cuda.is_available() and not args.no_roofline:
            ctx = (w.prompt_lens[0] + w.output_lens[0] // 2) if w.name == "W1" else 0
            result["roofline"] = roofline(engine, measure_copy_bandwidth(), ctx)
            best = min(r["tpot_mean_ms"] for r in runs if r["tpot_mean_ms"])
            result["fraction_of_floor"] = (
                result["roofline"]["floor_ms_per_step"] / best if w.name == "W1" else None
            )
            result["fraction_of_nominal_floor"] = (
                result["roofline"]["floor_ms_per_step_at_nominal"] / best
                if w.name == "W1"
                else None
            )


def _hf_or_error(args: argparse.Namespace, w: Workload) -> dict[str, Any]:
    from headrace.bench.hf_baseline import hf_baseline

    try:
        return hf_baseline(args, w.prompt_lens, w.output_lens)
    except Exception as e:  # OOM or anything else: the engine's result stands
        message = f"{type(e).__name__}: {e}"[:1000]
        print(f"HF generate baseline failed: {message}", file=sys.stderr, flush=True)
        gc.collect()  # the traceback held the HF model
        return {"error": message}


def _write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(result, indent=2))


def summary_line(result: dict[str, Any]) -> str:
    r = result["headrace"][-1]
    line = f"{result['workload']}: {r['output_tok_s']:.1f} output tok/s, {r['total_tok_s']:.1f} total tok/s"
    if r["tpot_mean_ms"]:
        line += f", TPOT {r['tpot_mean_ms']:.2f} ms"
    if "max_num_seqs" in result:
        line += (
            f" [max_num_seqs {result['max_num_seqs']}, max_num_batched_tokens "
            f"{result['max_num_batched_tokens']}, {r.get('preemptions', 0)} preemptions]"
        )
    if r.get("prefill_tile_steps"):
        line += f" [flat prefill grid on {r['prefill_tile_steps']} steps]"
    if "roofline" in result:
        rl = result["roofline"]
        line += f" ({rl['weights']} weights, {rl['kv_cache_dtype']} KV, {result['num_kv_blocks']}"
        line += f" KV blocks; floor {rl['floor_ms_per_step']:.2f} ms/step"
        if result.get("fraction_of_floor"):
            line += f", {100 * result['fraction_of_floor']:.1f}% of floor"
        if result.get("fraction_of_nominal_floor"):
            line += (
                f"; {rl['weight_GB_read_per_step']:.2f} GB/step at 4.25 TB/s: "
                f"{rl['floor_ms_per_step_at_nominal']:.2f} ms, "
                f"{100 * result['fraction_of_nominal_floor']:.1f}%"
            )
        line += ")"
    hf = result.get("hf_generate")
    if hf is not None and "error" in hf:
        line += f"; HF generate failed: {hf['error'][:120]}"
    elif hf is not None:
        line += (
            f"; HF generate {hf['useful_output_tok_s']:.1f} tok/s ({hf['attn_implementation']}"
            f"{', cut at the time limit' if hf['truncated'] else ''}), "
            f"{result['speedup_vs_hf']:.1f}x"
        )
    return line


def latency_main(args: argparse.Namespace) -> int:
    return _main(args, "W1")


def throughput_main(args: argparse.Namespace) -> int:
    return _main(args, "W3")
