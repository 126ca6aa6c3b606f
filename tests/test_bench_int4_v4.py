"""scripts/bench_int4_v4.py (the gpu_bench step int4r4) on CPU with a fake clock: one line a
shape and its variant listings, every variant timed by events and by graphs, the verdict."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from cuda import int4_gemm as ig
from cuda import int4_mma_gemv as mg
from cuda import int4_v4_gemv as v4

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_v4", ROOT / "scripts" / "bench_int4_v4.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decide() -> None:
    bench = _bench()
    assert bench.decide("a", {"a": 10.0, "b": 9.6}).startswith("rule stands (a; best b 4%")
    assert bench.decide("a", {"a": 10.0, "b": 5.0}) == "rule loses: b 50% faster than a by graphs"
    assert bench.decide("b", {"a": 10.0, "b": 5.0}).startswith("rule stands (b; best b 0%")


def test_bench_prints_every_shape_and_variant(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    clock = iter(range(1, 10**6))
    launched: list[str] = []
    monkeypatch.setattr(ig, "GEMV_IMPL", ig.GEMV_IMPL)  # the bench sets it: restored after
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "SHAPES", {"8b.o": (64, 256), "70b.down": (32, 1024)})
    monkeypatch.setattr(bench, "timed", lambda fn, iters=50: (fn(), 1e-6 * next(clock))[1])
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 4.0e12)
    monkeypatch.setattr(bench, "graphed", lambda fn: fn)
    monkeypatch.setattr(mg, "_sms", lambda device: 132)
    monkeypatch.setattr(mg, "gemv", lambda x, w, y, v=None: launched.append(mg.label(v)))
    monkeypatch.setattr(v4, "gemv", lambda x, w, y, v=None: launched.append(v4.label(v)))
    out = tmp_path / "v4.json"
    monkeypatch.setattr(sys, "argv", ["bench_int4_v4.py", "--output-json", str(out)])
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    print("\n".join(lines))
    assert len(lines) == 1 + 2 * 4
    assert lines[1].startswith("8b.o") and lines[5].startswith("70b.down")
    # 2 k-blocks: one warp a tile (MIN_RUN); 8: four warps
    assert "r3[w4_u2_pf]" in lines[1] and "r4[w1_s4]" in lines[1] and "M=8 graphs" in lines[1]
    assert "r4[w4_s4]" in lines[5]
    assert lines[2].startswith("    r3 variants") and "rule" in lines[2]
    assert (
        lines[4].startswith("    rules: r3 w4_u2_pf: 4 tiles") and "r4 w1_s4: 4 tiles" in lines[4]
    )
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        assert set(row["events_us"]) == set(row["graph_us"]) == {"mma", "v4", "cublas_bf16"}
        assert set(row["mma_variants_us"]) == {mg.label(v) for v in mg.VARIANTS}
        assert set(row["v4_variants_us"]) == {v4.label(v) for v in v4.VARIANTS}
        assert all(e < g for e, g in row["v4_variants_us"].values())  # events first, then graphs
        assert row["graph_frac_copy"]["v4"] > 0
        assert row["mma_verdict"].startswith("rule loses: w4_u2 ")  # timed first: fastest
    assert rows[0]["v4_verdict"].startswith("rule stands (w1_s4")
    assert rows[1]["v4_verdict"].startswith("rule loses: w1_s4 9% faster than w4_s4")
    twice = [lb for v in mg.VARIANTS for lb in [mg.label(v)] * 2]  # events, then graphs
    twice += [lb for v in v4.VARIANTS for lb in [v4.label(v)] * 2]
    assert launched == twice * 2
