"""scripts/bench_int4_tiled.py (the gpu_bench step int4tiled) on CPU with a fake clock: one
line a shape x M, today / skinny / tiled / cuBLAS bf16, each path dispatched as its switches
say on the loader's layout; the step's timeouts."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from cuda import int4_gemm as ig
from cuda import int4_tiled_gemm as tg
from tests.int4_gemm_cases import ROOT, fake_gpu_bench, load_script


def _bench() -> Any:
    return load_script("bench_tiled", "bench_int4_tiled.py")


def test_bench_prints_every_shape_and_row_count(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    launched: list[str] = []
    saved = {s: getattr(ig, s) for s in bench.SWITCHES}
    fake_gpu_bench(monkeypatch, bench, launched)

    def gemm(x: torch.Tensor, w: ig.Int4Weight, y: torch.Tensor, splits: Any = None) -> None:
        launched.append(f"{w.layout[0]}t{len(x)}" + (f"S{splits}" if splits else ""))

    monkeypatch.setattr(tg, "gemm", gemm)
    out = tmp_path / "tiled.json"
    monkeypatch.setattr(
        sys, "argv", ["bench_int4_tiled.py", "--rows", "33", "64", "--output-json", str(out)]
    )
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    print("\n".join(lines))
    assert len(lines) == 1 + 2 * 3  # M = 64 adds its split listing
    assert lines[1].startswith("8b.o        stream M=33 ") and "| tiled " in lines[1]
    assert lines[3].startswith("    tiled splits at M=64 us: S1 ") and "-> best" in lines[3]
    assert lines[5].startswith("70b.down    rows   M=64 ") and "| tiled " in lines[5]
    assert "today[dequant+cuBLAS]" in lines[1] and "[1x1x1 blocks, 2 k-blocks a split]" in lines[1]
    assert "S2" in lines[3] and "S4" not in lines[3]  # 8b.o here: K 256, 2 k-blocks
    # per shape: M = 33 today, skinny, tiled; M = 64 the same, then the forced splits
    # (s/r: the stream / rows skinny; st/rt: tiled on the stream / rows layout)
    splits = {"8b.o": ["st64S1", "st64S2"], "70b.down": ["rt64S1", "rt64S2", "rt64S4", "rt64S8"]}
    assert launched == (
        ["dequant", "s33", "st33", "dequant", "s64", "st64", *splits["8b.o"]]
        + ["dequant", "r33", "rt33", "dequant", "r64", "rt64", *splits["70b.down"]]
    )
    assert saved == {s: getattr(ig, s) for s in bench.SWITCHES}
    data = json.loads(out.read_text())
    assert [(r["shape"], r["m"]) for r in data["rows"]] == [
        ("8b.o", 33),
        ("8b.o", 64),
        ("70b.down", 33),
        ("70b.down", 64),
    ]
    assert set(data["rows"][0]["graph_us"]) == {"today", "skinny", "tiled", "cublas_bf16"}
    assert data["rows"][0]["speedup"] == pytest.approx(1 / 3)  # fake clock: 1, 2, 3, 4 us
    assert data["rows"][0]["vs_cublas"] == pytest.approx(4 / 3)


def test_gpu_bench_step() -> None:
    """gpu_bench.sh's int4tiled step: warm, the GPU tests (<= 60 s), the bench (<= 60 s)."""
    text = (ROOT / "scripts" / "gpu_bench.sh").read_text()
    step = re.search(r"\n    int4tiled\)(.*?);;\n", text, re.S)
    assert step is not None and "# int4tiled (<= 140 s" in text
    body = step.group(1)
    assert [int(t) for t in re.findall(r"timeout (\d+)", body)] == [20, 60, 60]
    assert "tests/gpu/test_gpu_int4_tiled.py" in body and "scripts/bench_int4_tiled.py" in body
    assert "--only int4_tiled_gemm int4_mma_gemv int4_v4_gemv int4_gemm" in body
