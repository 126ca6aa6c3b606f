"""scripts/bench_prefill.py's CPU half: the side-by-side line and the FLOP count's shapes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from cuda import prefill_v2 as v2


def _script() -> ModuleType:
    path = Path(__file__).parents[1] / "scripts" / "bench_prefill.py"
    spec = importlib.util.spec_from_file_location("bench_prefill", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_line_shows_old_the_default_and_sdpa() -> None:
    bench = _script()
    default = v2.DEFAULT_CONFIG.name
    assert list(bench.default_runners()) == ["old", default]
    tflops: dict[str, float | None] = {"old": 150.0, default: 350.0}
    row = {
        "dtype": "bfloat16",
        "batch": 1,
        "q_len": 16384,
        "ctx": 16384,
        "TFLOPs": tflops,
        "max_abs_new_minus_old": 0.0039,
    }
    line = bench.show(row | {"TFLOPs": tflops | {"sdpa_flash": 330.0}})
    assert "old  150.0" in line and "sdpa_flash  330.0" in line and f"{default}  350.0" in line
    assert f"default ({default}) / sdpa {350 / 330:.2f}x" in line
    chunked = bench.show(row | {"TFLOPs": tflops | {"sdpa_flash": None}})
    assert "sdpa_flash    n/a" in chunked and "/ sdpa" not in chunked


def test_shapes_cover_causal_2k_to_16k() -> None:
    bench = _script()
    causal = {q for b, q, c in bench.SHAPES if q == c and b == 1}
    assert {2048, 4096, 8192, 16384} <= causal
    assert all(q < c for _, q, c in bench.CHUNKED)


def test_round2_lines_compare_round_2_configs_old_and_sdpa() -> None:
    bench = _script()
    assert list(bench.round2_runners()) == ["old", *v2.BY_NAME]
    tflops: dict[str, float | None] = {"old": 150.0}
    tflops |= {c.name: 320.0 + i for i, c in enumerate(v2.CONFIGS)}
    default = tflops[v2.DEFAULT_CONFIG.name]
    assert default is not None
    best_name = v2.CONFIGS[-1].name
    best = 320.0 + len(v2.CONFIGS) - 1
    row = {"kv": "bf16", "batch": 4, "q_len": 2048, "ctx": 2048, "max_abs_diff_to_first": 0.004}
    line = bench.show_round2(row | {"TFLOPs": tflops | {"sdpa_flash": 284.0}})
    assert line.startswith("prefill3 kv=bf16 B=4 q= 2048") and "\n" not in line
    assert all(name in line for name in tflops)
    assert f"best {best_name} ({best / default:.2f}x default)" in line
    assert f"best / old {best / 150:.2f}x" in line
    assert f"best / sdpa {best / 284:.2f}x" in line
    assert f"default / sdpa {default / 284:.2f}x" in line
    line = bench.show_round2(row | {"kv": "fp8", "TFLOPs": tflops})
    assert f"best / old {best / 150:.2f}x" in line and "sdpa" not in line


def test_alternated_rounds_give_the_median_ratio_and_its_range() -> None:
    import pytest

    bench = _script()
    got = bench.ratio_summary([1.0, 2.0, 1.0], [1.1, 1.8, 0.9])  # ratios 1.1, 0.9, 0.9
    assert got == pytest.approx({"median": 0.9, "min": 0.9, "max": 1.1})
    with pytest.raises(ValueError):
        bench.ratio_summary([1.0], [])
    row = {
        "dtype": "bfloat16",
        "batch": 4,
        "q_len": 2048,
        "rounds": 3,
        "TFLOPs_ours": [300.0, 290.0, 310.0],
        "TFLOPs_sdpa": [280.0, 285.0, 282.0],
        "ratio": {"median": 1.06, "min": 1.02, "max": 1.1},
    }
    line = bench.show_alternate(row)
    assert line.startswith("prefill alternated bfloat16 B=4 q= 2048 x3")
    assert "300.0" in line and "282.0" in line
    assert "median 1.06x (min 1.02x, max 1.10x)" in line
