"""`headrace bench structured`: the cost of structured output per output token.

Two runs on one engine, all requests at once (batch `--num-requests`, default 64): free
decoding, then every request constrained by a JSON schema. Dummy weights sample random
tokens, so a schema that could close would close early and leave the rest unconstrained;
this one cannot close within the run (an array of at least 100000 records), so every
token of the constrained run goes through the mask. Both runs ignore EOS and produce
exactly `--output-len` tokens per request; the figure is the mean time per output token
(TPOT), constrained over free, minus one.

Per constrained step it also reports where the mask work went (worker/grammar_masks.py):
the mask thread's time (accepting tokens, filling rows), the time the engine thread
waited for it at sampling time (what the overlap failed to hide: ~0 when it works), and
the time to assemble and send the mask; on a GPU, the device time of the mask's copy and
of applying it to the logits.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from typing import Any

from ipc.messages import GrammarKind, GuidedDecoding

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "value": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "value", "tags"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 100000, "items": RECORD}},
    "required": ["records"],
    "additionalProperties": False,
}


def add_args(p: argparse.ArgumentParser) -> None:
    from headrace.bench.offline import add_args as add_offline_args

    add_offline_args(p)
    models = os.environ.get("HEADRACE_SHARED_MODELS", "../shared/models")
    p.set_defaults(tokenizer=os.path.join(models, "llama3-tokenizer"), max_num_seqs=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)


def structured_main(args: argparse.Namespace) -> int:

    from headrace.bench.offline import Workload, _card, _commit, run_engine
    from headrace.engine_args import engine_config_from_args
    from headrace.tp_group import start_engine
    from worker.grammar_masks import MaskStats

    n = args.num_requests or 64
    config = engine_config_from_args(args)
    engine = start_engine(config)
    guided = GuidedDecoding(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
    w = Workload("structured", [args.prompt_len] * n, [args.output_len] * n)
    # Warm-up: every path, and the grammar compiled (and its vocabulary built) once.
    run_engine(engine, Workload("warmup", [64] * 2, [16] * 2), 0, False, guided)
    run_engine(engine, Workload("warmup", [64] * 2, [16] * 2), 0, False)
    free = run_engine(engine, w, args.workload_seed, True)
    engine.runner.masks.stats = MaskStats()
    constrained = run_engine(engine, w, args.workload_seed, True, guided)
    mask = engine.runner.masks.stats.per_step()
    if engine.device.type == "cuda":
        mask.update(device_mask_costs(n, engine.model_config.vocab_size))
    overhead = constrained["tpot_mean_ms"] / free["tpot_mean_ms"] - 1
    result: dict[str, Any] = {
        "bench": "structured",
        "requests": n,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "schema": SCHEMA,
        "card": _card(),
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "config": {k: v for k, v in asdict(config).items() if k != "extra"},
        "free": free,
        "constrained": constrained,
        "tpot_overhead": overhead,
        "mask": mask,
    }
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(json.dumps(result, indent=2))
    print(
        f"structured output, batch {n}: TPOT free {free['tpot_mean_ms']:.2f} ms, "
        f"JSON schema {constrained['tpot_mean_ms']:.2f} ms: {100 * overhead:+.1f}% per output "
        f"token (output tok/s {free['output_tok_s']:.0f} -> {constrained['output_tok_s']:.0f})"
    )
    print(mask_line(mask))
    return 0


def mask_line(m: dict[str, float]) -> str:
    line = (
        f"mask per step: thread {m['job_ms_per_step']:.3f} ms, waited at sampling "
        f"{m['wait_ms_per_step']:.3f} ms, assemble+send {m['assemble_ms_per_step']:.3f} ms; "
        f"rows prefetched {m['rows_prefetched']:.0f}, filled at sampling {m['rows_filled_now']:.0f}"
        f", gathers {m['gathers']:.0f} of {m['steps']:.0f} steps"
    )
    if "device_apply_ms" in m:
        line += f"; device: copy {m['device_copy_ms']:.3f} ms, apply {m['device_apply_ms']:.3f} ms"
    return line


def device_mask_costs(rows: int, vocab: int, reps: int = 50) -> dict[str, float]:
    """GPU time of one step's mask: the pinned host -> device copy, and the apply."""
    import torch

    from worker.structured import apply_bitmask

    words = (vocab + 31) // 32
    host = torch.randint(-(2**31), 2**31 - 1, (rows, words), dtype=torch.int32).pin_memory()
    mask = torch.empty((rows, words), dtype=torch.int32, device="cuda")
    logits = torch.randn(rows, vocab, device="cuda")
    out = {}
    for name, op in (
        ("device_copy_ms", lambda: mask.copy_(host, non_blocking=True)),
        ("device_apply_ms", lambda: apply_bitmask(logits, mask)),
    ):
        op()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            op()
        end.record()
        end.synchronize()
        out[name] = start.elapsed_time(end) / reps
    return out
