"""scripts/bench_int4.py's logic on CPU (no GPU here; the lead runs it once on the H200, so
it must work the first time): every label, the best-variant pick, the summary and JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from cuda import int4_gemm as ig
from cuda import int4_gemv as sk
from cuda import int4_mma_gemv as mg
from cuda import int4_v4_gemv as v4

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_int4", ROOT / "scripts" / "bench_int4.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_int4_runs_and_reports_every_variant(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    launched: list[str] = []
    clock = iter(range(1, 10**6))
    monkeypatch.setattr(ig, "GEMV_IMPL", ig.GEMV_IMPL)  # the bench switches it: restored after
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "SHAPES", {"tiny": (64, 256), "tall": (128, 1024)})
    monkeypatch.setattr(bench, "timed", lambda fn, iters=50: (fn(), 1e-6 * next(clock))[1])
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 4.0e12)
    monkeypatch.setattr(sk, "_sms", lambda device: 132)
    monkeypatch.setattr(sk, "gemv", lambda x, w, y, plan: launched.append(plan.name))
    monkeypatch.setattr(bench, "graphed", lambda fn: fn)
    monkeypatch.setattr(mg, "_sms", lambda device: 132)
    monkeypatch.setattr(
        mg, "gemv", lambda x, w, y, v=None: launched.append(mg.kernel_name(*(v or (0, 0, 0))))
    )
    out = tmp_path / "int4.json"
    monkeypatch.setattr(
        sys, "argv", ["bench_int4.py", "--prefill-tokens", "16", "--output-json", str(out)]
    )
    bench.main()
    text = capsys.readouterr().out
    print(text)
    result = json.loads(out.read_text())
    assert [r["shape"] for r in result["rows"]] == ["tiny", "tall"]
    for row in result["rows"]:
        labels = set(row["us"]) - {"old", "rule", "tiles", "mma"}
        assert {lb.rsplit("_s", 1)[0] for lb in labels} == {f"r{r}_w{w}" for r, w in sk.VARIANTS[1]}
        # The fake clock grows with each call: the first variant timed is the fastest.
        assert row["best_variant"] == next(lb for lb in row["us"] if lb in labels)
        assert row["rule_pick"].startswith("r") and row["frac_copy"]["old"] > 0
        assert {"m8_old_us", "m8_split_us", "m8_tiles_us", "prefill_tflops"} <= set(row)
        assert {"m2_old_us", "m2_mma_us", "m4_mma_us", "m8_mma_us"} <= set(row)
        assert set(row["mma_variants_us"]) == {mg.label(v) for v in mg.VARIANTS}
        assert row["mma_best"] == "w4_u2"  # timed first: the fake clock's fastest
        assert set(row["graph_us"]) == {"old", "mma", "cublas_bf16"}
    assert "best variant per shape (M = 1): tiny r" in text
    assert "graphs | graph old" in text and "mma rule[w4_u2_pf] best[w4_u2]" in text
    assert set(launched) >= {f"gemv_sk_m1_r{r}_w{w}" for r, w in sk.VARIANTS[1]}
    assert set(launched) >= set(mg.kernel_names())


def test_warm_kernels_compiles_what_the_loaders_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/warm_kernels.py's jobs hit the cache keys the kernels' loaders ask for."""
    import torch

    from cuda import (
        argmax,
        compiler,
        decode_attention,
        fused_ops,
        gemv,
        gemv_step,
        int4_gemm,
        kv_write_kernel,
        layer_ops,
        norm_quant,
        prefill_v2,
    )
    from cuda import int4_tiled_gemm as tiled
    from cuda import paged_attention_kernels as pak
    from cuda import prefill_attention as pa

    spec = importlib.util.spec_from_file_location("warm", ROOT / "scripts" / "warm_kernels.py")
    assert spec is not None and spec.loader is not None
    warm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(warm)
    asked: list[tuple[str, str, dict]] = []

    class _Mod:
        def kernel(self, name: str) -> str:
            return name

    def load_module(source: str, *, defines: dict | None = None, name: str = "") -> _Mod:
        asked.append((name, source, dict(defines or {})))
        return _Mod()

    monkeypatch.setattr(compiler, "load_module", load_module)
    for dtype in (torch.bfloat16, torch.float16):
        for m_t in sk.M_TEMPLATES:
            sk._kernel(dtype, sk.split_plan(64, 256, m_t, *sk.VARIANTS[m_t][0]))
        int4_gemm._kernel(dtype, "k")
        for v in gemv_step.VARIANTS:
            gemv_step._kernel("", 1, dtype, v)
        compiler.load_module(gemv.source(), defines=gemv.module_defines(dtype), name="gemv")
        mg._kernel(dtype, "k")
        v4._kernel(dtype, "k")
        tiled._kernel(dtype, "k")  # the tiled GEMM (issue 14)
        for head_dim in (64, 128):
            monkeypatch.setattr(decode_attention, "_allow_smem", lambda *a: None)
            for config in decode_attention.CONFIGS:  # every variant (each KV type's default)
                cfg = decode_attention.parse_config(config)
                decode_attention._kernel(dtype, head_dim, "k", cfg)
            for kv_dtype in (None, torch.float8_e4m3fn):  # the old decode kernels
                pak._kernel(dtype, head_dim, "k", kv_dtype)
            monkeypatch.setattr(pa, "_allow_smem", lambda *a: None)
            for fp8 in (False, True):  # the prefill kernel, 16-bit and FP8 KV
                prefill_v2._kernel(dtype, head_dim, fp8, prefill_v2.DEFAULT_CONFIG)
    pak._kernel(torch.bfloat16, 128, "k")
    monkeypatch.setenv(decode_attention.PLAN_ENV, "v3")  # v3's picks compile its merge
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            for config in ("w2s3", "w4s3", "w4s4"):
                cfg = decode_attention.parse_config(config)
                decode_attention._kernel(dtype, head_dim, "k", cfg)
    monkeypatch.delenv(decode_attention.PLAN_ENV)
    fused_ops._kernel(torch.bfloat16, "k")
    monkeypatch.setattr(compiler, "launch", lambda *a, **k: None)
    layer_ops._launch(torch.bfloat16, ("k", (1,), 32, ()))
    compiler.load_module(kv_write_kernel.SOURCE, name="write_kv")  # as write_kv_cuda does
    compiler.load_module(argmax.SOURCE, name="argmax")  # as argmax_rows does
    for dtype in (torch.bfloat16, torch.float16):  # as norm_quant.add_rms_norm_quant does
        compiler.load_module(
            norm_quant.source(), defines=norm_quant.module_defines(dtype), name="norm_quant"
        )
    assert sorted(set(map(repr, asked))) == sorted(map(repr, warm.jobs()))


def test_bench_int4_mma_prints_one_line_per_shape(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """scripts/bench_int4_mma.py (the gpu_bench step int4w1) on CPU with a fake clock."""
    spec = importlib.util.spec_from_file_location(
        "bench_mma", ROOT / "scripts" / "bench_int4_mma.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    clock = iter(range(1, 10**6))
    launched: list[str] = []
    monkeypatch.setattr(ig, "GEMV_IMPL", ig.GEMV_IMPL)
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench.B4, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "SHAPES", {"8b.tiny": (64, 256), "8b.tall": (32, 1024)})
    monkeypatch.setattr(bench.B4, "timed", lambda fn, iters=50: (fn(), 1e-6 * next(clock))[1])
    monkeypatch.setattr(bench.B4, "copy_bandwidth", lambda: 4.0e12)
    monkeypatch.setattr(bench, "graphed", lambda fn: fn)
    monkeypatch.setattr(mg, "_sms", lambda device: 132)
    monkeypatch.setattr(mg, "gemv", lambda x, w, y, v=None: launched.append(mg.label(v)))
    out = tmp_path / "mma.json"
    argv = ["bench_int4_mma.py", "--shapes", "8b.tiny", "8b.tall", "--output-json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    print("\n".join(lines))
    assert len(lines) == 3 and lines[1].startswith("8b.tiny") and lines[2].startswith("8b.tall")
    assert "mma[w4_u2_pf]" in lines[1] and "M=2/4/8 old" in lines[1]
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        assert set(row["us"]) == set(row["graph_us"]) == {"old", "mma", "cublas_bf16"}
        assert set(row["mma_variants_us"]) == {mg.label(v) for v in mg.VARIANTS}
        assert row["mma_best"] == mg.label(mg.VARIANTS[0])  # timed first: the fastest
        assert set(row["rows_us"]) == {f"m{m}_{i}" for m in (2, 4, 8) for i in ("old", "mma")}
        assert row["frac_copy"]["mma"] > 0 and row["graph_frac_copy"]["cublas_bf16"] > 0
    assert launched == [mg.label(v) for v in mg.VARIANTS] * 2
