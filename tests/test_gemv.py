"""The small-M GEMV (cuda/gemv.py) on CPU: it compiles for sm_90 without spills, its launch
arguments follow the kernel's parameter list, the rule picks what it says, the reference is
F.linear's math, and DenseLinear dispatches through the rule."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from cuda import compiler, gemv
from tests.kernel_signatures import launch_types
from worker.models.dense import DenseLinear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_compiles_without_spills(
    dtype: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiler, "CACHE_DIR", tmp_path)
    cubin, log = compiler.compile_cubin(
        gemv.source(),
        arch="sm_90",
        defines=gemv.module_defines(dtype),
        name="gemv",
        verbose_ptxas=True,
    )
    for name in gemv.KERNELS:
        assert f"Compiling entry function '{name}'" in log
        assert name.encode() in cubin
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    assert len(spills) == len(gemv.KERNELS) and not any(spills), log
    assert not any(int(n) for n in re.findall(r"(\d+) bytes stack frame", log)), log


@pytest.mark.parametrize("m", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_launch_arguments_follow_the_kernel(m: int, bias: bool) -> None:
    n, k = 1003, 4104
    x = torch.randn(m, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    b = torch.randn(n, dtype=torch.bfloat16) if bias else None
    out = torch.empty(m, n, dtype=torch.bfloat16)
    name, grid, block, args = gemv.gemv_launch(x, w, b, out)
    assert name == f"gemv_m{m}"
    rows = 4 if m <= 4 else 2
    assert grid == (-(-n // rows),)  # every output feature has a block, none spare
    assert (grid[0] - 1) * rows < n <= grid[0] * rows
    assert block % 32 == 0 and 32 <= block <= 256
    assert [type(a) for a in args] == launch_types(gemv.source())[name]
    assert args[0] == x.data_ptr() and args[2] == w.data_ptr() and args[4] == out.data_ptr()
    assert args[3] == (0 if b is None else b.data_ptr())
    assert args[1] == k and args[5] == n and args[6] == n and args[7] == k


def test_threads_cover_the_row_with_unrolled_chunks() -> None:
    for k in (8, 64, 520, 2048, 4096, 4104, 14336, 28672):
        t = gemv.threads_for(k)
        assert t % 32 == 0 and 32 <= t <= 256
        chunks = k // gemv.VEC
        # 256 threads unless fewer already give every thread its UNROLL chunks
        assert t == 256 or t * gemv.UNROLL >= chunks
    assert gemv.threads_for(4096) == 256 and gemv.threads_for(64) == 32


def test_rule() -> None:
    mib = 2**20
    # the 8B model's fused q/k/v and o (bf16): the GEMV; gate/up, down and lm_head: cuBLAS
    assert gemv.use_gemv(1, 6144, 4096, 2, "auto")
    assert gemv.use_gemv(2, 4096, 4096, 2, "auto")
    assert not gemv.use_gemv(3, 4096, 4096, 2, "auto")  # M > 2: cuBLAS (H200: faster from 4 rows)
    assert gemv.use_gemv(8, 4096, 4096, 2, "all")
    assert not gemv.use_gemv(1, 28672, 4096, 2, "auto")
    assert gemv.use_gemv(1, 4096, 14336, 2, "auto")  # down (112 MiB): round 2 only
    assert not gemv.use_gemv(1, 4096, 14336, 2, "old")
    assert gemv.use_gemv(1, 6144, 4096, 2, "old")
    assert not gemv.use_gemv(1, 128256, 4096, 2, "auto")
    assert gemv.use_gemv(1, 128256, 4096, 2, "all")
    assert not gemv.use_gemv(9, 16, 16, 2, "all")  # prefill sizes never
    assert not gemv.use_gemv(0, 16, 16, 2, "all")
    assert not gemv.use_gemv(1, 16, 16, 2, "cublas")
    n = gemv.GEMV_MAX_WEIGHT_BYTES // (2 * 1024)
    assert gemv.use_gemv(2, n, 1024, 2, "old") and not gemv.use_gemv(2, n + 1, 1024, 2, "old")
    n = gemv.GEMV2_MAX_WEIGHT_BYTES // (2 * 1024)
    assert gemv.use_gemv(2, n, 1024, 2, "auto") and not gemv.use_gemv(2, n + 1, 1024, 2, "auto")
    assert 48 * mib <= gemv.GEMV_MAX_WEIGHT_BYTES  # the q/k/v matrix above


def test_round2_threshold_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_GEMV_MAX_MIB", "64")
    assert gemv.use_gemv(1, 6144, 4096, 2, "auto") and gemv.use_gemv(1, 4096, 4096, 2, "auto")
    assert not gemv.use_gemv(1, 4096, 14336, 2, "auto")  # down back on cuBLAS
    monkeypatch.setenv("HEADRACE_GEMV_MAX_MIB", "lots")
    with pytest.raises(ValueError, match="HEADRACE_GEMV_MAX_MIB"):
        gemv.use_gemv(1, 6144, 4096, 2, "auto")
    monkeypatch.delenv("HEADRACE_GEMV_MAX_MIB")
    assert gemv.gemv2_max_weight_bytes() == gemv.GEMV2_MAX_WEIGHT_BYTES


def test_mode_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADRACE_GEMV", raising=False)
    assert gemv.gemv_mode() == "cublas"  # cuBLAS by default (W1 was slower with round 2)
    monkeypatch.setenv("HEADRACE_GEMV", "auto")
    assert gemv.gemv_mode() == "auto"
    monkeypatch.setenv("HEADRACE_GEMV", "fast")
    with pytest.raises(ValueError, match="HEADRACE_GEMV"):
        gemv.gemv_mode()


def test_supported_layouts() -> None:
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.randn(24, 64, dtype=torch.bfloat16)
    assert gemv.gemv_supported(x, w, None)
    assert gemv.gemv_supported(x, w, torch.zeros(24, dtype=torch.bfloat16))
    assert not gemv.gemv_supported(x, w, torch.zeros(24, dtype=torch.float32))
    assert not gemv.gemv_supported(x.float(), w.float(), None)  # fp32: cuBLAS
    assert not gemv.gemv_supported(torch.randn(9, 64, dtype=torch.bfloat16), w, None)
    assert not gemv.gemv_supported(x[:, :60], w[:, :60].contiguous(), None)  # K % 8
    assert not gemv.gemv_supported(x, w.t().contiguous().t(), None)  # w not row-major
    big = torch.randn(4, 72, dtype=torch.bfloat16)
    assert not gemv.gemv_supported(big[:, 1:65], w, None)  # x rows misaligned
    assert not gemv.gemv_supported(torch.randn(4, 68, dtype=torch.bfloat16)[:, :64], w, None)
    assert gemv.gemv_supported(torch.randn(4, 80, dtype=torch.bfloat16)[:, :64], w, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_matches_linear(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 136, generator=g).to(dtype)
    w = torch.randn(37, 136, generator=g).to(dtype)
    b = torch.randn(37, generator=g).to(dtype)
    want = (x.double() @ w.double().t() + b.double()).to(dtype)
    got = gemv.gemv_ref(x, w, b)
    assert got.dtype == dtype and got.shape == (5, 37)
    torch.testing.assert_close(got, want, atol=0, rtol=2**-7)
    # gemv() on CPU tensors is the reference, into `out` when given
    out = torch.full((5, 37), float("nan"), dtype=dtype)
    assert gemv.gemv(x, w, b, out=out) is out
    torch.testing.assert_close(out, got, atol=0, rtol=0)


def test_dense_linear_dispatches_through_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def fake_gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> str:
        calls.append((x, w, b))
        return "gemv"

    monkeypatch.setattr(gemv, "gemv", fake_gemv)
    round2: list[Any] = []

    def fake_run(prologue: str, x: torch.Tensor, w: torch.Tensor, b: Any) -> str:
        round2.append((prologue, x, w, b))
        return "gemv2"

    monkeypatch.setattr(gemv.gemv_step, "run", fake_run)

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self) -> bool:  # type: ignore[override]
            return True

    layer = DenseLinear(64, 24, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    # CPU: F.linear, whatever the mode
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert not calls
    fake = x.as_subclass(FakeCuda)
    monkeypatch.setenv("HEADRACE_GEMV", "old")
    assert gemv.linear(fake, layer.weight, layer.bias) == "gemv"
    monkeypatch.setenv("HEADRACE_GEMV", "auto")
    assert isinstance(gemv.linear(fake, layer.weight, layer.bias), torch.Tensor)  # 3 rows: cuBLAS
    assert gemv.linear(fake[:2], layer.weight, layer.bias) == "gemv2"
    assert len(round2) == 1 and round2[0][0] == "" and round2[0][3] is layer.bias
    monkeypatch.setenv("HEADRACE_GEMV", "cublas")
    assert isinstance(gemv.linear(fake, layer.weight, layer.bias), torch.Tensor)
    monkeypatch.setenv("HEADRACE_GEMV", "all")
    big = torch.randn(9, 64, dtype=torch.bfloat16).as_subclass(FakeCuda)
    assert isinstance(gemv.linear(big, layer.weight, layer.bias), torch.Tensor)  # M > 8
    assert len(calls) == 1 and len(round2) == 1
    assert torch.equal(calls[0][0].as_subclass(torch.Tensor), x)


def test_models_build_dense_linears() -> None:
    from torch import nn

    from worker.models.layers import make_linear

    layer = make_linear(64, 32, False, ["q_proj"], None)
    assert isinstance(layer, DenseLinear) and isinstance(layer, nn.Linear)


def test_argmax_kernel_compiles_and_launches() -> None:
    from cuda import argmax

    _, log = compiler.compile_cubin(
        argmax.SOURCE, arch="sm_90", name="argmax", verbose_ptxas=True, use_cache=False
    )
    for name in argmax.KERNELS.values():  # fp32, bf16, fp16: no spills, no stack frame
        assert f"Compiling entry function '{name}'" in log
    assert len(re.findall(r"0 bytes stack frame, 0 bytes spill stores", log)) == 3, log
    x = torch.randn(3, 128256)[:, :128000]
    keys, counts = torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int32)
    out = torch.empty(3, dtype=torch.int64)
    name, grid, block, args = argmax.argmax_launch(x, keys, counts, out)
    assert [type(a) for a in args] == launch_types(argmax.SOURCE)[name]
    assert name == "argmax_rows" and block == 256
    per = int(args[3])  # type: ignore[call-overload]
    assert per % 1024 == 0 and grid == (-(-128000 // per), 3)  # every column once
    assert args[1] == 128256 and args[2] == 128000 and args[4] == 1  # rows 16-byte aligned
    for dtype, kernel in ((torch.bfloat16, "argmax_rows_bf16"), (torch.float16, "argmax_rows_f16")):
        h = torch.randn(880, 128264, dtype=dtype)[:, :128256]
        name, grid, _, args = argmax.argmax_launch(h, keys, counts, out)
        assert name == kernel and args[3] % 2048 == 0 and args[4] == 1  # type: ignore[operator]
        assert 4096 <= grid[0] * grid[1] < 8192 and grid[1] == 880
        assert argmax.argmax_supported(h)
        odd = torch.randn(2, 100, dtype=dtype)[:, 3:]  # rows start 6 bytes in: scalar loads
        assert argmax.argmax_launch(odd, keys, counts, out)[3][4] == 0
        assert torch.equal(argmax.argmax_rows(h[:4]), h[:4].argmax(dim=-1))
    assert argmax.per_block(1, 128256, 2) == 2048  # one 16-byte load per thread, 63 blocks
    assert argmax.argmax_supported(x) and not argmax.argmax_supported(x.double())
    # CPU: torch's argmax
    assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1))


def test_argmax_keys_order_as_torch() -> None:
    """The kernel's 64-bit keys, computed here in numpy: the largest key is torch's argmax
    (first index of the maximum), -inf rows included."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 300, generator=g)
    x[1, 17] = x[1, 250] = 9.0  # a tie
    x[2] = float("-inf")
    x[3, :] = -0.0
    x[3, 40] = 0.0  # +0 and -0 tie for torch
    x[4] = -torch.rand(300, generator=g) - 1.0  # all negative
    import numpy as np

    u = (x + 0.0).numpy().view(np.uint32).astype(np.uint64)  # + 0.0: -0 -> +0, as the kernel
    ordered = np.where(u & 0x80000000, ~u & 0xFFFFFFFF, u | 0x80000000)
    keys = (ordered << 32) | (0xFFFFFFFF - np.arange(300, dtype=np.uint64))
    ids = 0xFFFFFFFF - (keys.max(axis=1) & 0xFFFFFFFF)
    want = x.argmax(dim=-1).numpy()
    assert list(ids) == list(want)
    assert ids[1] == 17 and ids[2] == 0 and ids[3] == 0


def test_bench_suggests_the_largest_size_where_the_gemv_never_loses() -> None:
    from scripts.bench_gemv import suggest_threshold

    def row(size: int, gemv_us: float, cublas_us: float) -> dict:
        return {"weight_bytes": size, "gemv2_us": gemv_us, "cublas_us": cublas_us}

    rows = [row(32, 8, 10), row(32, 9, 10), row(48, 12, 16), row(112, 31, 30), row(224, 50, 60)]
    assert suggest_threshold(rows) == 48  # loses at 112: nothing above counts
    assert suggest_threshold([row(32, 11, 10)]) == 0
