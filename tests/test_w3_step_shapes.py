"""The flat prefill grid on the offline bench's own path, and scripts/w3_step_shapes.py's
numbers (CPU): every eager step with a q_len > 1 row carries the tile map when the runner
has a TileSpec (async scheduling and the persistent batch included), the bench reports how
many did, and the script's block counts match the synthetic bench step's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cuda import prefill_tiles as pt
from headrace.bench import offline


def test_every_mixed_step_of_the_bench_carries_the_map(
    stories_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.input_batch as ib
    import worker.model_runner as mr

    # On a GPU HEADRACE_PREFILL_GRID=flat gives the runner a TileSpec; on CPU it gives None
    # (no CUDA kernel runs), so the spec is given here. TorchAttention ignores the map.
    monkeypatch.setattr(mr, "prefill_tile_spec", lambda config, device: pt.TileSpec(4, 128))
    seen: list[tuple[int, int, bool]] = []  # (max_query_len, decode rows, map built)
    real = ib.to_device

    def recording(host: Any, device: Any, tiles: Any = None) -> Any:
        inputs = real(host, device, tiles)
        decode = int((np.diff(host.query_start_loc) == 1).sum())
        split = inputs.md.decode_split  # the map is then the chunks' (worker/decode_split.py)
        md = inputs.md if split is None else split.prefill
        seen.append((host.max_query_len, decode, md.prefill_tiles is not None))
        return inputs

    monkeypatch.setattr(mr, "to_device", recording)

    def mixed(name: str, num_requests: int | None, seed: int) -> offline.Workload:
        # Prompts that chunk (batched tokens 32) beside decoding requests: mixed steps.
        return offline.Workload(name, [8, 40, 24, 60, 12], [12, 3, 9, 4, 6])

    monkeypatch.setattr(offline, "make_workload", mixed)
    p = argparse.ArgumentParser()
    offline.add_args(p)
    args = p.parse_args(
        ["--model", str(stories_path), "--device", "cpu", "--num-gpu-blocks", "64",
         "--max-model-len", "128", "--max-num-batched-tokens", "32", "--workload", "W3",
         "--output-json", str(tmp_path / "out.json")]
    )  # fmt: skip
    assert offline.throughput_main(args) == 0
    prefill = [s for s in seen if s[0] > 1]
    assert any(d > 0 for _, d, _ in prefill), "no mixed step: the test shows nothing"
    assert all(built for _, _, built in prefill)  # every eager q_len > 1 step: the map
    assert not any(built for q, _, built in seen if q == 1)  # decode steps: none
    result = json.loads((tmp_path / "out.json").read_text())
    # the warm-up request's prefill is not counted: only the measured run's steps
    assert 0 < result["headrace"][-1]["prefill_tile_steps"] <= len(prefill)
    assert all(k.startswith("HEADRACE_") for k in result["env"])


def test_the_script_reproduces_the_bench_step_and_its_fit() -> None:
    from scripts import w3_step_shapes as w3

    model, bench = w3.fit()
    assert (bench["z_blocks"], bench["flat_blocks"]) == (309_248, 6_848)
    g = w3.grid_numbers(w3.bench_step())
    assert w3.Model.work_s(model, g) * 1e6 == pytest.approx(w3.BENCH_FLAT_US)
    assert model.z_s(g) * 1e6 == pytest.approx(w3.BENCH_Z_US)
    # 4 x 2k: no empty blocks either way, its work at the prefill rate (~454 us measured)
    four = w3.StepShape(np.full(4, 2048), np.full(4, 2048))
    g4 = w3.grid_numbers(four)
    assert g4["z_blocks"] == g4["flat_blocks"] == 8 * 4 * 64
    assert 400 < model.z_s(g4) * 1e6 < 520


def test_bench_prefill_grid_reads_recorded_steps(tmp_path: Path) -> None:
    from scripts import bench_prefill_grid as bench

    steps = [{"q_lens": [1, 5 + i], "seq_lens": [10, 20 + i]} for i in range(23)]
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"steps": steps}))
    cases = bench.recorded_shapes(str(path), 11)
    assert list(cases) == ["step5", "step16"]
    q, s, fp8 = cases["step16"]
    assert q.tolist() == [1, 21] and s.tolist() == [10, 36] and not fp8
    rows = [
        {"z_us": 300.0, "flat_us": 200.0, "z_us_32": 250.0, "flat_us_32": 200.0},
        {"z_us": 200.0, "flat_us": 200.0, "z_us_32": 250.0, "flat_us_32": 200.0},
    ]
    line = bench.run_saving(rows, 100)
    assert "2 of 100 mixed steps" in line and "50.0 us a call single" in line
    assert "= 0.160 s (0.160 s)" in line  # 50 us x 32 layers x 100 steps


def test_grid_ab_switches_the_runner_grid(
    stories_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from scripts import w3_grid_ab

    monkeypatch.setattr(
        offline, "make_workload", lambda name, n, seed: offline.Workload(name, [40, 8], [3, 6])
    )
    out = tmp_path / "ab.json"
    monkeypatch.setattr(
        "sys.argv",
        ["w3_grid_ab.py", "--model", str(stories_path), "--device", "cpu", "--num-gpu-blocks",
         "64", "--max-model-len", "128", "--max-num-batched-tokens", "32", "--profile",
         "--order", "z,flat,z", "--output-json", str(out)],
    )  # fmt: skip
    w3_grid_ab.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[1].rstrip(":") for ln in lines[:3]] == ["z", "flat", "z"]
    assert lines[-1].startswith("w3ab z - flat: ")
    runs = json.loads(out.read_text())["runs"]
    assert [r["prefill_tile_steps"] for r in runs][0::2] == [0, 0]  # z: no map
    assert runs[1]["prefill_tile_steps"] > 0 and runs[1]["output_tokens"] == 9
    assert runs[1]["mixed_gpu_busy_ms"] is None  # CPU: no GPU events
