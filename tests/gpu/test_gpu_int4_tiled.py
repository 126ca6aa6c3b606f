"""The tiled W4A16 GEMM (issue 14: cuda/int4_tiled_gemm.cu on the rows and stream layouts) on
the GPU against the dequantize-then-matmul reference: fresh random shapes (rows: N % 16 != 0
too, group sizes 32 / 64 / 128 / 256 / K; stream: what it takes), M = 33, 64, 100, 150, 256,
512, bf16 and fp16, poisoned outputs, strided x, the rule's K splits and forced ones;
int4_linear's dispatch with HEADRACE_INT4_TILED_MAX on (rows past M untouched, a perm, the env
in a fresh process); CUDA graph replay equal to eager (split and not). <= 60 s on an H200."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cuda import int4_gemm as ig
from cuda import int4_tiled_gemm as tg
from tests.gpu.int4_helpers import (
    assert_graph_replays_eager,
    check,
    check_linear_poisoned,
    gpu_weight,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROWS = (33, 64, 100, 150, 256, 512)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def tiled_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """int4_linear as under HEADRACE_INT4_TILED_MAX=512 (the default, 0, is off), skinny on
    its defaults (17..32), round 3 on rows weights (HEADRACE_INT4_GEMV=v4)."""
    monkeypatch.setattr(ig, "TILED_MAX_ROWS", 512)
    monkeypatch.setattr(ig, "SKINNY_MIN_ROWS", 17)
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 32)
    monkeypatch.setattr(ig, "GEMV_IMPL", "v4")


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_match_reference(seed: int) -> None:
    rng = random.Random(9100 + seed)
    dtype = torch.bfloat16 if seed % 2 == 0 else torch.float16
    k = 128 * rng.choice([1, 3, 7, 32, 112])
    group_size = rng.choice([g for g in (32, 64, 128, 256, k) if k % g == 0])
    n = rng.choice([1, 15, 40, 333, 4096, 6144 + rng.randrange(1, 40)])
    m = ROWS[seed % len(ROWS)]
    w = gpu_weight(n, k, group_size, perm=False, seed=seed)
    wide = torch.randn(m, k + 64, device="cuda", dtype=dtype)
    x = wide[:, 32 : 32 + k] if rng.random() < 0.5 else wide[:, :k].contiguous()  # strided x
    for splits in (None, 1, 3):
        y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        tg.gemm(x, w, y, splits)
        torch.cuda.synchronize()
        check(y, x, w)  # also: every element written


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_linear_tiled_path(
    m: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Llama-like shapes (8B down splits 7 ways at 33..64 rows), poisoned out, rows past M
    untouched; a perm (x gathered) at 100 rows; no dequantize."""
    monkeypatch.setattr(ig, "dequantize", lambda *a, **k: pytest.fail("dequantized with tiled on"))
    for n, k, group_size in ((4096, 14336, 128), (1000, 1024, 1024), (6144, 4096, 64)):
        w = gpu_weight(n, k, group_size, perm=m == 100, seed=m + n)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        check_linear_poisoned(x, w, n)


@pytest.mark.parametrize("seed", range(8))
def test_random_stream_shapes_match_reference(seed: int) -> None:
    """tiled_gemm_stream: N % 16 == 0, power-of-two groups >= 64 (what the layout takes)."""
    rng = random.Random(9200 + seed)
    dtype = torch.bfloat16 if seed % 2 == 0 else torch.float16
    k = 128 * rng.choice([1, 3, 7, 32, 112])
    group_size = rng.choice([g for g in (64, 128, 256, k) if k % g == 0 and g & (g - 1) == 0])
    n = 16 * rng.choice([1, 3, 25, 256, 384 + rng.randrange(1, 9)])
    m = ROWS[seed % len(ROWS)]
    w = gpu_weight(n, k, group_size, perm=False, seed=seed).as_stream()
    wide = torch.randn(m, k + 64, device="cuda", dtype=dtype)
    x = wide[:, 32 : 32 + k] if rng.random() < 0.5 else wide[:, :k].contiguous()
    for splits in (None, 1, 3):
        y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        tg.gemm(x, w, y, splits)
        torch.cuda.synchronize()
        check(y, x, w)


@pytest.mark.parametrize("m", [33, 100, 256])
def test_int4_linear_tiled_stream_path(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ig, "dequantize", lambda *a, **k: pytest.fail("dequantized with tiled on"))
    dtype = torch.bfloat16 if m % 2 else torch.float16
    for n, k, group_size in ((4096, 14336, 128), (6144, 4096, 64)):
        w = gpu_weight(n, k, group_size, perm=m == 100, seed=m + n).as_stream()
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        check_linear_poisoned(x, w, n)


@pytest.mark.parametrize("m", [64, 150])
def test_stream_graph_replay_equals_eager(m: int) -> None:
    w = gpu_weight(4096, 14336, 128, perm=False, seed=196 + m).as_stream()
    x = torch.randn(m, 14336, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, 4096, device="cuda", dtype=torch.bfloat16)
    assert_graph_replays_eager(lambda out: ig.int4_linear(x, w, out=out), x, y, w)


def test_large_activations_stay_finite() -> None:
    w = gpu_weight(4096, 14336, 128, perm=False, seed=8)
    x = (torch.randn(64, 14336, device="cuda") * 300).to(torch.float16)
    y = torch.full((64, 4096), float("nan"), device="cuda", dtype=torch.float16)
    tg.gemm(x, w, y)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    check(y, x, w)


@pytest.mark.parametrize(
    ("m", "n", "k"), [(64, 4096, 14336), (150, 28672, 1024), (512, 8192, 2048)]
)
def test_graph_replay_equals_eager(m: int, n: int, k: int) -> None:
    w = gpu_weight(n, k, 128, perm=False, seed=96 + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    assert_graph_replays_eager(lambda out: ig.int4_linear(x, w, out=out), x, y, w)


def test_env_switch_in_a_fresh_process() -> None:
    """HEADRACE_INT4_TILED_MAX=512 read at import: 100 rows run tiled_gemm, the result right;
    unset (64) or 0, the same call dequantizes."""
    code = (
        "import torch\n"
        "from cuda import int4_gemm as ig, int4_tiled_gemm as tg\n"
        "from tests.gpu.int4_helpers import check, gpu_weight\n"
        "seen = []\n"
        "real = tg.gemm\n"
        "tg.gemm = lambda *a, **k: (seen.append(1), real(*a, **k))\n"
        "w = gpu_weight(2048, 4096, 128, perm=False, seed=10)\n"
        "x = torch.randn(100, 4096, device='cuda', dtype=torch.bfloat16)\n"
        "check(ig.int4_linear(x, w), x, w)\n"
        "print(len(seen))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADRACE_INT4_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])

    def launched(**extra: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, **extra},
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    assert launched(HEADRACE_INT4_TILED_MAX="512") == "1"
    assert launched() == "0"
    assert launched(HEADRACE_INT4_TILED_MAX="0") == "0"
