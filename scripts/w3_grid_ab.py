"""W3 under the z and the flat prefill grid in one engine, one process (the A/B that call 4
of session 8 did not have: its flat run and its z run came from different calls, commits and
flags). The grid is the runner's TileSpec (worker/model_runner.py's prefill_tiles, which
HEADRACE_PREFILL_GRID sets at startup), switched between runs; the engine, its KV cache and
its graphs stay. Per run: output tok/s, the steps that carried a tile map, and with
--profile (the step timeline) the mixed eager steps' mean GPU busy (scripts/w3_step_shapes.py predicts
~10.6 ms less a mixed step under flat on W3's 1000 requests, ~1.4 s a run).

    python scripts/w3_grid_ab.py --profile --order z,flat --output-json w3_grid_ab.json

Takes `headrace bench throughput`'s engine arguments (its defaults: the Llama-3-8B config,
dummy weights). One line a run, then the z - flat differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from headrace.bench import offline
from headrace.engine_args import engine_config_from_args
from worker.step_timeline import StepTimeline


def grid_spec(engine: Any, grid: str) -> Any:
    """The runner's TileSpec for `grid` ('z': None)."""
    if grid == "z":
        return None
    from cuda import prefill_v2

    c = engine.model_config
    return prefill_v2.tile_spec(c.num_heads, c.num_kv_heads)


def one_run(engine: Any, w: offline.Workload, seed: int, grid: str, profile: bool) -> dict:
    engine.runner.prefill_tiles = grid_spec(engine, grid)
    timeline = StepTimeline(engine).attach() if profile else None
    row: dict[str, Any] = {"grid": grid, **offline.run_engine(engine, w, seed, progress=False)}
    if timeline is not None:
        timeline.detach()
        row["timeline"] = timeline.summary()
        mixed = row["timeline"].get("mixed/eager", {})
        row["mixed_steps"] = mixed.get("steps")
        row["mixed_gpu_busy_ms"] = mixed.get("gpu_busy_ms")
    return row


def show(row: dict) -> str:
    line = (
        f"w3ab {row['grid']:4s}: {row['output_tok_s']:.1f} output tok/s, "
        f"{row['elapsed_s']:.2f} s, {row['steps']} steps, {row['preemptions']} preemptions, "
        f"map on {row['prefill_tile_steps']} steps"
    )
    if row.get("mixed_gpu_busy_ms") is not None:
        line += f", {row['mixed_steps']} mixed eager steps at {row['mixed_gpu_busy_ms']:.1f} ms GPU"
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    offline.add_args(p)
    p.add_argument("--order", default="z,flat", help="grids to run, in order (z, flat)")
    args = p.parse_args()
    grids = args.order.split(",")
    if any(g not in ("z", "flat") for g in grids):
        p.error(f"--order takes z and flat, got {args.order!r}")
    w = offline.make_workload(args.workload or "W3", args.num_requests, args.workload_seed)
    config = engine_config_from_args(args, usage_context="offline")
    from headrace.tp_group import start_engine

    rows = []
    with start_engine(config) as engine:
        for grid in dict.fromkeys(grids):  # warm each grid's path once (kernel, map)
            engine.runner.prefill_tiles = grid_spec(engine, grid)
            offline.run_engine(engine, offline.Workload("warmup", [64, 32], [16, 4]), 0, False)
        for grid in grids:
            rows.append(one_run(engine, w, args.workload_seed, grid, args.profile))
            print(show(rows[-1]), flush=True)
    z = [r for r in rows if r["grid"] == "z"]
    f = [r for r in rows if r["grid"] == "flat"]
    if z and f:
        dt = z[-1]["elapsed_s"] - f[-1]["elapsed_s"]
        line = f"w3ab z - flat: {dt:.3f} s ({100 * dt / z[-1]['elapsed_s']:.2f}% of z's run)"
        zb, fb = z[-1].get("mixed_gpu_busy_ms"), f[-1].get("mixed_gpu_busy_ms")
        if zb is not None and fb is not None:
            line += f", mixed step GPU {zb - fb:.2f} ms (predicted ~10.6 on 1000 requests)"
        print(line, flush=True)
    if args.output_json:
        with open(args.output_json, "w") as fh:
            json.dump({"workload": w.name, "requests": len(w.prompt_lens), "runs": rows}, fh)


if __name__ == "__main__":
    main()
