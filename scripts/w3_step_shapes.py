"""The mixed steps of a workload as the engine schedules them, and what the flat prefill grid
(HEADRACE_PREFILL_GRID=flat, cuda/prefill_tiles.py) should save on each (CPU, no model).

The schedule is scripts/sim_async_schedule.py's (the engine's Scheduler and KVCacheManager,
a stub model); every step with a row of q_len > 1 (the steps that run prefill round 2 eagerly)
is recorded: rows, decode rows (q_len 1), prefill rows, tokens, max_query_len, per-row q_len
and seq_len. For each, per attention call (one layer):

    z blocks     num_kv_heads x batch x ceil(max_query_len x group / BM)   (launch_grid)
    flat blocks  num_kv_heads x len(build_tile_map(...))                   (the real TileSpec)
    work         sum over the map's tiles of BM x kv_hi x head_dim x 4 FLOPs (QK^T and PV on
                 the whole BM-row tile, padded rows included: a decode row fills 4 of 128),
                 at a rate fitted so the synthetic bench step's flat time comes out; the
                 requests' KV bytes (read once) at the copy bandwidth bound it from below
    z - flat     (z blocks - flat blocks) x a cost per empty block, fitted to the synthetic
                 bench step's z - flat gap (scripts/bench_prefill_grid.py, BENCHMARKS.md
                 session 8 call 4: 2,238 vs 1,840 us for 309,248 vs 6,848 blocks)

then the run's sums (x 32 layers): the predicted saving of flat in seconds, and per step.
Every number it prints is an estimate from two H200 measurements, not a benchmark.

    python scripts/w3_step_shapes.py --json w3_steps.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuda import prefill_tiles as pt
from scripts.sim_async_schedule import simulate
from worker.scheduler import SchedulerOutput

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 128  # Llama-3-8B
GROUP = Q_HEADS // KV_HEADS
BLOCK_M = 128  # prefill round 2's default configuration (v2_m128n64w4s2k32)
KV_BYTES = 2  # bf16
COPY_BW = 4.24e12  # bytes/s, `headrace bench kernels` in call 4
# Prefill tiles' (padded) FLOP rate: 4 x 2k back to back, 453.9 us (call 4) on these tiles.
PREFILL_FLOPS = 300e12
# The synthetic bench step (BENCHMARKS.md session 8 call 4, single L2-flushed calls).
BENCH_Z_US, BENCH_FLAT_US = 2238.0, 1840.0
BENCH_Z_BLOCKS, BENCH_FLAT_BLOCKS = 309_248, 6_848


@dataclass(frozen=True)
class StepShape:
    q_lens: np.ndarray  # [B] tokens computed this step per row
    seq_lens: np.ndarray  # [B] keys each row's last token sees

    @staticmethod
    def of(out: SchedulerOutput) -> StepShape:
        q = np.array([sr.num_new_tokens for sr in out.scheduled], dtype=np.int64)
        s = np.array([sr.end - sr.kv_offset for sr in out.scheduled], dtype=np.int64)
        return StepShape(q, s)

    @property
    def mixed(self) -> bool:
        return bool(self.q_lens.max() > 1)


def grid_numbers(shape: StepShape) -> dict[str, float]:
    """Blocks of each grid, the prefill rows' tile FLOPs and the decode rows' KV bytes, for
    one layer call."""
    spec = pt.TileSpec(GROUP, BLOCK_M)
    qsl = np.concatenate([[0], np.cumsum(shape.q_lens)])
    tiles = pt.build_tile_map(qsl, shape.seq_lens, spec)
    keys = pt.tile_work(shape.q_lens, shape.seq_lens, tiles.astype(np.int64), spec)
    prefill_tile = shape.q_lens[tiles[:, 0]] > 1
    decode = shape.q_lens == 1
    z_tiles = math.ceil(int(shape.q_lens.max()) * GROUP / BLOCK_M)
    return {
        "z_blocks": KV_HEADS * len(shape.q_lens) * z_tiles,
        "flat_blocks": KV_HEADS * len(tiles),
        # QK^T and PV over the whole BM-row tile up to its kv_hi (masked rows included).
        "prefill_flops": float(KV_HEADS * 4 * BLOCK_M * HEAD_DIM * keys[prefill_tile].sum()),
        # A decode row's tile reads its KV once: bandwidth-bound, 4 of its 128 rows live.
        "decode_kv_bytes": float(KV_HEADS * 2 * HEAD_DIM * KV_BYTES * shape.seq_lens[decode].sum()),
    }


@dataclass(frozen=True)
class Model:
    decode_efficiency: float  # decode rows' KV bytes, as a fraction of copy bandwidth
    empty_s: float  # seconds a z-grid block without work costs

    def work_s(self, g: dict[str, float]) -> float:
        prefill = g["prefill_flops"] / PREFILL_FLOPS
        return prefill + g["decode_kv_bytes"] / (COPY_BW * self.decode_efficiency)

    def z_s(self, g: dict[str, float]) -> float:
        return self.work_s(g) + (g["z_blocks"] - g["flat_blocks"]) * self.empty_s


def bench_step() -> StepShape:
    """scripts/bench_prefill_grid.py's mixed shape (its rng, seed 0), numpy only."""
    rng = np.random.default_rng(0)
    decode_q, decode_s = np.ones(600, dtype=np.int64), rng.integers(200, 2001, 600)
    chunk_q, chunk_s = np.full(4, 2048), rng.integers(2048, 4097, 4)
    q, s = np.concatenate([chunk_q, decode_q]), np.concatenate([chunk_s, decode_s])
    order = rng.permutation(len(q))
    return StepShape(q[order], s[order])


def fit() -> tuple[Model, dict[str, float]]:
    """Decode efficiency from the bench step's flat time (its prefill tiles at
    PREFILL_FLOPS), the empty-block cost from its z - flat gap."""
    g = grid_numbers(bench_step())
    assert (g["z_blocks"], g["flat_blocks"]) == (BENCH_Z_BLOCKS, BENCH_FLAT_BLOCKS), g
    empty = (BENCH_Z_US - BENCH_FLAT_US) * 1e-6 / (g["z_blocks"] - g["flat_blocks"])
    decode_s = BENCH_FLAT_US * 1e-6 - g["prefill_flops"] / PREFILL_FLOPS
    return Model(g["decode_kv_bytes"] / COPY_BW / decode_s, empty), g


def describe(shape: StepShape, g: dict[str, float], m: Model) -> dict[str, float]:
    decode = int((shape.q_lens == 1).sum())
    return {
        "rows": len(shape.q_lens),
        "decode_rows": decode,
        "prefill_rows": len(shape.q_lens) - decode,
        "tokens": int(shape.q_lens.sum()),
        "max_query_len": int(shape.q_lens.max()),
        **g,
        "flat_us": m.work_s(g) * 1e6,
        "z_us": m.z_s(g) * 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # The H200 run's engine: headrace bench throughput --workload W3 (1000 requests, seed 0)
    # with max_num_seqs 1024, max_num_batched_tokens 16384, 55,408 blocks of 16, async on.
    p.add_argument("--workload", default="W3")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=55_408)
    p.add_argument("--sync", action="store_true", help="schedule without async overlap")
    p.add_argument("--json", help="write every mixed step's numbers (and its rows) here")
    args = p.parse_args()

    model, bench = fit()
    shapes: list[StepShape] = []
    r = simulate(args, not args.sync, on_step=lambda out: shapes.append(StepShape.of(out)))
    steps = [(s, grid_numbers(s)) for s in shapes if s.mixed]
    rows = [describe(s, g, model) for s, g in steps]

    print(
        f"fit on the bench step: prefill tiles {bench['prefill_flops'] / 1e12:.3f} TFLOP at "
        f"{PREFILL_FLOPS / 1e12:.0f} TFLOP/s, decode rows' KV {bench['decode_kv_bytes'] / 1e6:,.0f} "
        f"MB at {100 * model.decode_efficiency:.0f}% of {COPY_BW / 1e12:.2f} TB/s, "
        f"{model.empty_s * 1e9:.2f} ns an empty block"
    )
    print(
        f"{args.workload}: {r['steps']} steps, {len(rows)} mixed (q_len > 1), "
        f"{r['preemptions']} preemptions"
    )

    def stat(key: str) -> str:
        v = np.array([x[key] for x in rows], dtype=np.float64)
        q = np.percentile(v, [0, 10, 50, 90, 100])
        return f"{key:14s} mean {v.mean():12,.0f} | min/p10/p50/p90/max " + " / ".join(
            f"{x:,.0f}" for x in q
        )

    for key in ("rows", "decode_rows", "prefill_rows", "tokens", "max_query_len"):
        print(stat(key))
    for key in ("z_blocks", "flat_blocks", "z_us", "flat_us"):
        print(stat(key))
    z = sum(x["z_us"] for x in rows) * LAYERS / 1e6
    f = sum(x["flat_us"] for x in rows) * LAYERS / 1e6
    print(
        f"attention over the run (x{LAYERS} layers): z {z:.2f} s, flat {f:.2f} s, "
        f"saving {z - f:.3f} s ({1e3 * (z - f) / max(len(rows), 1):.2f} ms a mixed step)"
    )
    like = [
        x
        for x in rows
        if x["max_query_len"] >= 1024 and x["decode_rows"] >= 300 and x["z_blocks"] >= 150_000
    ]
    print(
        f"steps like the bench's (max_query_len >= 1024, >= 300 decode rows, >= 150k z "
        f"blocks): {len(like)} of {len(rows)}"
    )
    if args.json:
        for (s, _), x in zip(steps, rows, strict=True):
            x["q_lens"], x["seq_lens"] = s.q_lens.tolist(), s.seq_lens.tolist()
        with open(args.json, "w") as fh:
            json.dump({"fit": vars(model) | {"bench": bench}, "steps": rows}, fh)


if __name__ == "__main__":
    main()
