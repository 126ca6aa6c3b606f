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
