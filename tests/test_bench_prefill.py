"""scripts/bench_prefill.py's CPU half: the side-by-side line and the FLOP count's shapes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from cuda import prefill_attention as pa


def _script() -> ModuleType:
    path = Path(__file__).parents[1] / "scripts" / "bench_prefill.py"
    spec = importlib.util.spec_from_file_location("bench_prefill", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_line_shows_old_each_config_and_sdpa() -> None:
    bench = _script()
    tflops: dict[str, float | None] = {"old": 150.0}
    tflops |= {c.name: 200.0 + i for i, c in enumerate(pa.CONFIGS)}
    new = pa.BY_NAME["m128n64w4s2v2"]
    row = {
        "dtype": "bfloat16",
        "batch": 1,
        "q_len": 16384,
        "ctx": 16384,
        "TFLOPs": tflops,
        "new_config": new.name,
        "max_abs_new_minus_old": 0.0039,
    }
    line = bench.show(row | {"TFLOPs": tflops | {"sdpa_flash": 330.0}})
    assert "old  150.0" in line and "sdpa_flash  330.0" in line
    assert all(c.name in line for c in pa.CONFIGS)
    t_new, t_r1 = tflops[new.name], tflops[pa.ROUND1_CONFIG.name]
    assert t_new is not None and t_r1 is not None
    assert f"new (m128n64w4s2v2) / sdpa {t_new / 330:.2f}x" in line
    assert f"r1 / sdpa {t_r1 / 330:.2f}x" in line
    assert f"best / sdpa {(200 + len(pa.CONFIGS) - 1) / 330:.2f}x" in line
    chunked = bench.show(row | {"TFLOPs": tflops | {"sdpa_flash": None}})
    assert "sdpa_flash    n/a" in chunked and "/ sdpa" not in chunked
    assert f"new (m128n64w4s2v2) / r1 {t_new / t_r1:.2f}x" in chunked


def test_summary_line_puts_new_and_round_1_side_by_side() -> None:
    bench = _script()
    tflops: dict[str, float | None] = {
        "old": 150.0,
        "m128n64w4s2": 330.0,
        "m128n128w8s2v2": 352.0,
        "m128n64w4s2v2": 360.0,
    }
    row = {"dtype": "bfloat16", "batch": 1, "q_len": 16384, "ctx": 16384}
    row |= {"new_config": "m128n128w8s2v2", "max_abs_new_minus_old": 0.0}
    line = bench.summary(row | {"TFLOPs": tflops | {"sdpa_flash": 340.0}})
    assert line == (
        "prefill bfloat16 1x16384: new m128n128w8s2v2  352.0 = 1.04x sdpa | r1 m128n64w4s2 "
        " 330.0 = 0.97x sdpa | sdpa 340.0 | best m128n64w4s2v2 360.0 TFLOP/s"
    )
    chunked = bench.summary(row | {"ctx": 20000, "TFLOPs": tflops | {"sdpa_flash": None}})
    assert "1x16384 on 20000" in chunked and "x sdpa" not in chunked


def test_configs_to_run_keep_round_1_and_the_default() -> None:
    bench = _script()
    long = pa.BY_NAME["m128n128w8s2v2"]
    assert bench.configs_to_run(None, long) == list(pa.CONFIGS)
    got = bench.configs_to_run(["m128n64w8s2v2"], long)
    assert [c.name for c in got] == ["m128n64w4s2", "m128n64w8s2v2", "m128n128w8s2v2"]


def test_shapes_cover_causal_2k_to_16k() -> None:
    bench = _script()
    causal = {q for b, q, c in bench.SHAPES if q == c and b == 1}
    assert {2048, 4096, 8192, 16384} <= causal
    assert all(q < c for _, q, c in bench.CHUNKED)


def test_gpu_bench_step_names_real_configs_within_its_budget() -> None:
    # scripts/gpu_bench.sh's prefill2 step: the tiles it times exist, its timeouts fit 90 s.
    import re

    script = (Path(__file__).parents[1] / "scripts" / "gpu_bench.sh").read_text()
    step = script[script.index("    prefill2)") :]
    step = step[: step.index(";;")]
    names = re.search(r"--configs ([\w ]+?) >", step)
    assert names is not None
    assert set(names.group(1).split()) <= set(pa.BY_NAME)
    assert {pa.ROUND1_CONFIG.name, *(c.name for c in pa.DEFAULT_CONFIG.values())} <= set(
        names.group(1).split()
    )
    assert sum(int(t) for t in re.findall(r"timeout (\d+)", step)) <= 90
    assert "--short" in step
