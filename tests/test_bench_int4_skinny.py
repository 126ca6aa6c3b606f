"""scripts/bench_int4_skinny.py (the gpu_bench step int4skinny) on CPU with a fake clock: one
line a shape x M, today's path and the skinny path dispatched as their env bounds say."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from cuda import int4_gemm as ig
from cuda import int4_mma_gemv as mg
from cuda import int4_v4_gemv as v4
from tests.int4_gemm_cases import ROOT, fake_gpu_bench, load_script


def _bench() -> Any:
    return load_script("bench_skinny", "bench_int4_skinny.py")


def test_bench_prints_every_shape_and_row_count(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    launched: list[str] = []
    saved = ig.GEMV_IMPL, ig.SKINNY_MIN_ROWS, ig.SKINNY_MAX_ROWS, ig.SKINNY_STREAM
    fake_gpu_bench(monkeypatch, bench, launched)
    monkeypatch.setattr(mg, "gemv", lambda x, w, y, v=None: launched.append("gemv"))
    monkeypatch.setattr(v4, "gemv", lambda x, w, y, v=None: launched.append("v4gemv"))
    out = tmp_path / "skinny.json"
    monkeypatch.setattr(
        sys, "argv", ["bench_int4_skinny.py", "--rows", "16", "64", "--output-json", str(out)]
    )
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    print("\n".join(lines))
    assert len(lines) == 1 + 2 * 3  # M = 64 adds its block-shape listing
    assert lines[3].startswith("    block shapes at M=64 us: t8_w1 ") and "-> best" in lines[3]
    assert lines[1].startswith("8b.o        stream M=16 ")
    assert lines[5].startswith("70b.down    rows   M=64 ")
    assert "today[2 GEMVs]" in lines[1] and "today[dequant+cuBLAS]" in lines[2]
    assert "[1 passes: 64 rows t8_w1_n8 x 1 blocks]" in lines[2]
    # per shape: M = 16 today (2 GEMVs), skinny; M = 64 today (dequant), skinny
    stream = ["v4gemv", "v4gemv", "s16", "dequant", "s64"]  # r: rows skinny, s: stream skinny
    assert (
        launched == stream + ["s64"] * 3 + ["gemv", "gemv", "r16", "dequant", "r64"] + ["r64"] * 3
    )
    assert saved == (ig.GEMV_IMPL, ig.SKINNY_MIN_ROWS, ig.SKINNY_MAX_ROWS, ig.SKINNY_STREAM)
    data = json.loads(out.read_text())
    assert [(r["shape"], r["m"]) for r in data["rows"]] == [
        ("8b.o", 16),
        ("8b.o", 64),
        ("70b.down", 16),
        ("70b.down", 64),
    ]
    assert set(data["rows"][0]["graph_us"]) == {"today", "skinny", "cublas_bf16"}
    assert data["rows"][0]["speedup"] == pytest.approx(1 / 2)  # fake clock: 1 us then 2 us


def test_gpu_bench_step() -> None:
    """gpu_bench.sh's int4skinny step: warm, the GPU tests (<= 60 s), the bench (<= 60 s)."""
    import re

    text = (ROOT / "scripts" / "gpu_bench.sh").read_text()
    step = re.search(r"\n    int4skinny\)(.*?);;\n", text, re.S)
    assert step is not None and "# int4skinny (<= 140 s" in text
    body = step.group(1)
    assert [int(t) for t in re.findall(r"timeout (\d+)", body)] == [20, 60, 60]
    assert "tests/gpu/test_gpu_int4_skinny.py" in body and "scripts/bench_int4_skinny.py" in body
    assert "--only int4_mma_gemv int4_v4_gemv int4_gemm" in body
