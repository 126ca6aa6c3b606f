"""Prefill round 2's z grid against its flat grid (HEADRACE_PREFILL_GRID, cuda/prefill_tiles.py):
microseconds per attention call at the Llama-3-8B shape (32 q heads, 8 KV heads, head_dim 128,
bf16, block_size 16, shuffled pages), round 2's default configuration.

    mixed      600 decode rows at seq_len 200-2000 + 4 chunks of 2048 tokens at seq_len
               2048-4096 (8,792 rows: issue 12's W3 mixed step)
    1x16k      one causal 16k prompt          4x2k   four causal 2k prompts (must not regress)
    mixed_fp8  the mixed step on an FP8 KV cache

Per shape: the median of one call with L2 flushed (scripts/bench_prefill.py's timing,
headrace.bench.gpu_timing), and the mean per call over 32 calls back to back (a step's 32
layers) after warm-up, both by CUDA events; the blocks each grid launches; the host's map
build; max|flat - z| (the same tiles: 0). One line a shape.

    PYTHONPATH=. python scripts/bench_prefill_grid.py --out bench_prefill_grid.json

--steps FILE (scripts/w3_step_shapes.py --json FILE: the mixed steps the engine's scheduler
makes on W3) times every `--every`-th recorded step instead (bf16, rows in the scheduler's
order), then the mean z - flat per call x 32 layers x the file's mixed steps: the run's
saving as measured on a sample of its own steps.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from cuda import prefill_tiles as pt
from cuda import prefill_v2 as v2
from cuda.kv_write import quantize_kv
from cuda.paged_attention import AttentionMetadata, AttentionParams
from scripts.bench_prefill import BS, FP8_SCALE, HKV, HQ, D, time_op

LAYERS = 32  # calls back to back: the attention of one step's layers


def shapes(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    """name -> (q_lens, seq_lens, fp8)."""
    decode_q, decode_s = np.ones(600, dtype=np.int64), rng.integers(200, 2001, 600)
    chunk_q, chunk_s = np.full(4, 2048), rng.integers(2048, 4097, 4)
    mixed_q = np.concatenate([chunk_q, decode_q])
    mixed_s = np.concatenate([chunk_s, decode_s])
    order = rng.permutation(len(mixed_q))  # chunks among the decode rows, as a scheduler mixes
    mixed = (mixed_q[order], mixed_s[order])
    return {
        "mixed": (*mixed, False),
        "1x16k": (np.array([16384]), np.array([16384]), False),
        "4x2k": (np.full(4, 2048), np.full(4, 2048), False),
        "mixed_fp8": (*mixed, True),
    }


def recorded_shapes(path: str, every: int) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    """Every `every`-th step of a scripts/w3_step_shapes.py JSON: name -> (q_lens, seq_lens,
    False), named by the step's index among the mixed steps."""
    with open(path) as f:
        steps = json.load(f)["steps"]
    return {
        f"step{i}": (np.array(st["q_lens"]), np.array(st["seq_lens"]), False)
        for i, st in enumerate(steps)
        if i % every == every // 2
    }


def run_saving(rows: list[dict], num_steps: int) -> str:
    """The sampled steps' mean z - flat per call, scaled to the run (x layers x steps)."""
    single = sum(r["z_us"] - r["flat_us"] for r in rows) / len(rows)
    b2b = sum(r[f"z_us_{LAYERS}"] - r[f"flat_us_{LAYERS}"] for r in rows) / len(rows)
    return (
        f"prefillgrid run: {len(rows)} of {num_steps} mixed steps timed, z - flat {single:.1f} "
        f"us a call single ({b2b:.1f} back to back) -> x{LAYERS} layers x {num_steps} steps = "
        f"{single * LAYERS * num_steps / 1e6:.3f} s ({b2b * LAYERS * num_steps / 1e6:.3f} s)"
    )


def paged_step(
    q_lens: np.ndarray, seq_lens: np.ndarray, fp8: bool
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, AttentionParams]:
    """q, the KV cache (pages shuffled), metadata and params of one step."""
    nblk = [math.ceil(int(s) / BS) for s in seq_lens]
    cache = torch.randn(2, sum(nblk), BS, HKV, D, dtype=torch.bfloat16, device="cuda")
    params = AttentionParams(D**-0.5)
    if fp8:
        cache = torch.stack([quantize_kv(cache[0], FP8_SCALE), quantize_kv(cache[1], FP8_SCALE)])
        params = AttentionParams(D**-0.5, k_scale=FP8_SCALE, v_scale=FP8_SCALE)
    perm = torch.randperm(sum(nblk), dtype=torch.int32)
    tables = torch.zeros(len(nblk), max(nblk), dtype=torch.int32)
    start = 0
    for r, n in enumerate(nblk):
        tables[r, :n] = perm[start : start + n]
        start += n
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    md = AttentionMetadata(
        torch.from_numpy(qsl).cuda(),
        torch.from_numpy(seq_lens.astype(np.int32)).cuda(),
        tables.cuda(),
        torch.empty(0, dtype=torch.int64, device="cuda"),  # attention only: no KV write
        int(q_lens.max()),
        int(seq_lens.max()),
    )
    q = torch.randn(int(qsl[-1]), HQ, D, dtype=torch.bfloat16, device="cuda")
    return q, cache, md, params


def back_to_back(fn: Callable[[], object], calls: int = LAYERS, rounds: int = 5) -> float:
    """Seconds per call, the best of `rounds` means over `calls` calls in a row (warmed)."""
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / calls)
    return best


def one_shape(name: str, q_lens: np.ndarray, seq_lens: np.ndarray, fp8: bool) -> dict:
    q, cache, md, params = paged_step(q_lens, seq_lens, fp8)
    config = v2.DEFAULT_CONFIG
    group = HQ // HKV
    spec = pt.TileSpec(group, config.block_m)
    qsl, lens = md.query_start_loc.cpu().numpy(), md.seq_lens.cpu().numpy()
    t0 = time.perf_counter()
    tiles = pt.build_tile_map(qsl, lens, spec)
    build_s = time.perf_counter() - t0
    flat_md = AttentionMetadata(
        md.query_start_loc, md.seq_lens, md.block_tables, md.slot_mapping, md.max_query_len,
        md.max_seq_len, prefill_tiles=torch.from_numpy(tiles).cuda(), prefill_tile_spec=spec,
    )  # fmt: skip
    assert v2.flat_tiles(flat_md, config, group) is not None
    outs = {"z": torch.empty_like(q), "flat": torch.empty_like(q)}
    mds = {"z": md, "flat": flat_md}
    row: dict = {"shape": name, "kv": "fp8" if fp8 else "bf16", "rows": int(q.shape[0])}
    z_blocks = math.prod(v2.launch_grid(config, md.max_query_len, group, HKV, len(lens)))
    row["blocks"] = {"z": z_blocks, "flat": HKV * len(tiles)}
    row["map_build_us"] = build_s * 1e6
    for grid in ("z", "flat"):

        def run(grid: str = grid) -> None:
            v2.prefill_v2_cuda(q, cache, mds[grid], params, outs[grid], config)

        row[f"{grid}_us"] = time_op(run) * 1e6
        row[f"{grid}_us_{LAYERS}"] = back_to_back(run) * 1e6
    row["max_abs_flat_minus_z"] = (outs["flat"].float() - outs["z"].float()).abs().max().item()
    return row


def show(row: dict) -> str:
    z, f = row["z_us"], row["flat_us"]
    zb, fb = row[f"z_us_{LAYERS}"], row[f"flat_us_{LAYERS}"]
    return (
        f"prefillgrid {row['shape']:9s} kv={row['kv']:4s} rows={row['rows']:5d} | "
        f"z {z:8.1f} us, flat {f:8.1f} us: {z / f:.2f}x | x{LAYERS} back to back: "
        f"z {zb:8.1f} us, flat {fb:8.1f} us per call: {zb / fb:.2f}x | "
        f"blocks z {row['blocks']['z']} flat {row['blocks']['flat']} | "
        f"map {row['map_build_us']:.0f} us host | max|flat-z| {row['max_abs_flat_minus_z']:.2g}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_prefill_grid.json")
    ap.add_argument("--steps", help="scripts/w3_step_shapes.py's JSON: time its steps instead")
    ap.add_argument("--every", type=int, default=11, help="with --steps: every N-th step")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    if args.steps:
        cases = recorded_shapes(args.steps, args.every)
        with open(args.steps) as f:
            num_steps = len(json.load(f)["steps"])
    else:
        cases = shapes(np.random.default_rng(0))
    for name, (q_lens, seq_lens, fp8) in cases.items():
        row = one_shape(name, q_lens, seq_lens, fp8)
        results.append(row)
        print(show(row), flush=True)
        torch.cuda.empty_cache()
    if args.steps:
        print(run_saving(results, num_steps), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
