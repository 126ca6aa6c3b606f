"""`headrace bench kernels` on CPU: the command is wired, refuses to run without a GPU with
a clear error, and can load scripts/bench_kernels.py's prefill part."""

from __future__ import annotations

import importlib.util

import pytest

from headrace import cli
from headrace.bench import kernels


def test_bench_kernels_is_a_bench_command() -> None:
    args = cli.build_parser().parse_args(["bench", "kernels", "--fp8", "--iters", "3"])
    assert args.func is kernels.kernels_main and args.fp8 and args.iters == 3


def test_without_a_gpu_it_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # the GPU step runs the real thing
    assert cli.main(["bench", "kernels"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_prefill_part_loads_from_the_script() -> None:
    spec = importlib.util.spec_from_file_location("bench_kernels_script", kernels.SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.bench_prefill)


def test_cells_are_the_issue_table() -> None:
    assert kernels.CELLS == ((64, 1024), (64, 4096), (64, 16384), (8, 16384))
    assert (kernels.HQ, kernels.HKV, kernels.D, kernels.BS) == (32, 8, 128, 16)


def _script(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, kernels.SCRIPT.with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_bench_cells_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/bench_decode.py: issue 11's cells, batch 1 at 128 / 256 under a 128k bound,
    and each variant's environment set only inside its timing (restored after)."""
    import os

    from cuda import decode_attention as da

    bd = _script("bench_decode")
    assert bd.TARGET_CELLS == kernels.CELLS
    assert (1, 128) in bd.SHORT_CELLS and (1, 256) in bd.SHORT_CELLS
    assert bd.SHORT_BOUND == 131072 and bd.SHORT_TARGET_US == 4.0
    sweep = _script("bench_kernels").SWEEP
    assert (1, 128) in sweep and (1, 256) in sweep
    monkeypatch.setenv(da.ENV, "old")
    monkeypatch.delenv(da.CONFIG_ENV, raising=False)
    with bd.env(bd.NEW | {da.CONFIG_ENV: "w2s3"}):
        assert os.environ[da.ENV] == "new" and os.environ[da.CONFIG_ENV] == "w2s3"
        assert da.config_for(2) == da.DecodeConfig(2, 3)
    assert os.environ[da.ENV] == "old" and da.CONFIG_ENV not in os.environ


def test_decode3_bench_runs_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/bench_decode3.py: every variant, v3 and (FP8) the fp16-math kernel per cell,
    W2's FP8 cells, and the plan / FP8-math variables set only inside a timing."""
    import os

    from cuda import decode_attention as da

    b3 = _script("bench_decode3")
    assert list(b3.runs_for(False)) == ["old", "v2", "w2s3", "w4s2", "w4s3", "w4s4", "v3"]
    assert list(b3.runs_for(True))[-2:] == ["f16", "v3+f16"]
    assert b3.ISSUE_CELLS == kernels.CELLS and (256, 1024) in b3.W2_CELLS
    assert (1024, 1536) in b3.W2_CELLS and (512, 2048) in b3.W2_CELLS
    monkeypatch.delenv(da.PLAN_ENV, raising=False)
    monkeypatch.setenv(da.FP8_MATH_ENV, "auto")
    with b3.bd.env(b3.runs_for(True)["v3+f16"]):
        assert da.plan3() and da.fp8_math_half() and os.environ[da.ENV] == "new"
    assert da.PLAN_ENV not in os.environ and os.environ[da.FP8_MATH_ENV] == "auto"


def test_decode3_step_fits_150_seconds() -> None:
    """The gpu_bench step decode3: its timeouts (W1's loop runs 3 times) sum to <= 150 s."""
    import re

    text = (kernels.SCRIPT.parent / "gpu_bench.sh").read_text()
    step = re.search(r"\n    decode3\)(.*?);;\n", text, re.S)
    assert step is not None
    body = step.group(1)
    loop = body[body.index("for c in default w4s2 v3") :]
    once = sum(int(t) for t in re.findall(r"timeout (\d+)", body[: len(body) - len(loop)]))
    assert once + 3 * sum(int(t) for t in re.findall(r"timeout (\d+)", loop)) <= 150
    assert "bench_decode3.py" in body and "HEADRACE_DECODE_CONFIG=w4s2" in body
