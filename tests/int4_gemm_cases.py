"""Helpers the skinny and tiled int4 GEMM tests share (tests/test_int4_skinny.py,
tests/test_int4_tiled.py and their benches' tests/test_bench_int4_{skinny,tiled}.py):
reading int4_gemm's env switches in a fresh interpreter, loading a bench script, and the
fakes that run a bench on CPU with a fake clock, recording which int4 path each call took."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from cuda import int4_gemm as ig
from cuda import int4_mma_gemv as mg
from cuda import int4_v4_gemv as v4

ROOT = Path(__file__).resolve().parents[1]


def read_switches(names: tuple[str, ...], drop: str, **extra: str) -> str:
    """int4_gemm's module constants `names` as printed by a fresh interpreter whose
    environment has no variable starting with `drop`, plus `extra`."""
    code = f"from cuda import int4_gemm as ig; print({', '.join(f'ig.{n}' for n in names)})"
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, **extra},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def load_script(module_name: str, file_name: str) -> Any:
    """scripts/`file_name` imported as a fresh module `module_name`."""
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "scripts" / file_name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_gpu_bench(monkeypatch: pytest.MonkeyPatch, bench: Any, launched: list[str]) -> None:
    """Run `bench` on CPU: two small shapes (8b.o in the stream layout, 70b.down in rows), a
    clock that says 1 us, 2 us, ... a call, no graphs, 132 SMs; the skinny kernels append
    r<rows> (rows layout) / s<rows> (stream) to `launched`, a dequantize "dequant"."""
    clock = iter(range(1, 10**6))
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "SHAPES", {"8b.o": (64, 256), "70b.down": (32, 1024)})
    monkeypatch.setattr(bench, "timed", lambda fn, iters=50: (fn(), 1e-6 * next(clock))[1])
    monkeypatch.setattr(bench, "graphed", lambda fn: fn)
    monkeypatch.setattr(mg, "_sms", lambda device: 132)
    monkeypatch.setattr(ig, "unsupported_reason", lambda x, w: None)  # CPU: the GPU paths
    monkeypatch.setattr(mg, "skinny", lambda x, w, y, v=None: launched.append(f"r{len(x)}"))
    monkeypatch.setattr(v4, "skinny", lambda x, w, y, v=None: launched.append(f"s{len(x)}"))
    monkeypatch.setattr(ig, "STREAM_MAX_WEIGHTS", 64 * 256)  # 8b.o below: stream; 70b.down: rows

    def dequantize(w: ig.Int4Weight, dtype: torch.dtype, out: Any = None) -> torch.Tensor:
        launched.append("dequant")
        return ig.dequantize_ref(w, dtype)

    monkeypatch.setattr(ig, "dequantize", dequantize)
