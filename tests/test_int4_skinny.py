"""The skinny W4A16 GEMM (cuda/int4_mma_gemv.cu's mma_skinny_*, issue 14) on CPU: its
fragment math and shared-memory staging emulated lane by lane against the reference, the
launch chunking, the rule, int4_linear's dispatch and the env switches, and sm_90 compiles."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

from cuda import compiler
from cuda import int4_gemm as ig
from cuda import int4_mma_gemv as mg
from cuda import int4_v4_gemv as v4
from tests.int4_gemm_cases import read_switches
from tests.int4_mma_emulation import emulate_skinny, emulate_skinny_launch
from tests.test_cuda_launch_args import _OnDevice, kernel_parameters
from tests.test_int4_mma_gemv import weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "n", "k", "group_size", "shape"),
    [
        (9, 40, 512, 128, (8, 1)),  # 3 tiles of a block's 8 past N; one 8-row tile + 1 row
        (33, 24, 1024, 256, (4, 2)),  # 5 tiles at NT = 8, the last of one row
        (64, 16, 384, 128, (2, 4)),  # 3 k-blocks over 4 slices of 1: slice 3 empty
        (100, 48, 768, 768, (4, 2)),  # 64 + 36 rows; one group (GPTQ's -1)
        (20, 17, 256, 128, (2, 4)),  # NT = 4; N % 16 = 1
    ],
)
def test_emulated_skinny_equals_reference(
    dtype: torch.dtype, m: int, n: int, k: int, group_size: int, shape: tuple[int, int]
) -> None:
    w = weight(n, k, group_size, seed=m + n + k, zmax=16)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(dtype)
    got = emulate_skinny(x, w, shape)
    ref = ig.int4_linear_ref(x.double(), w).numpy()
    assert not np.isnan(got).any(), "an output element was not written (or NaN x was read)"
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_emulation_catches_a_wrong_swizzle() -> None:
    """The check has teeth: a reader that ignores the row-parity bit of the swizzle (what
    the stage writes) reads other inputs' x and breaks the result."""
    from tests import int4_mma_emulation as em

    w = weight(16, 256, 128, seed=2)
    x = torch.randn(16, 256).to(torch.bfloat16)
    ref = ig.int4_linear_ref(x.double(), w).numpy()
    real = em.swizzle
    calls = {"n": 0}

    def reader_differs(row: np.ndarray, c: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        return real(row, c) if row.ndim == 3 else c >> 1  # stage: 3-d rows; the lanes: 1-d

    try:
        em.swizzle = reader_differs
        got = emulate_skinny_launch(x, w, (8, 1, 4))
    finally:
        em.swizzle = real
    assert calls["n"] > 1
    assert np.abs(got - ref).max() > 1e-3 * np.abs(ref).max()


def test_source_has_the_emulated_swizzle() -> None:
    text = mg.source()
    assert "(j ^ ((c >> 1) | ((row & 1) << 1)))" in text  # ms_stage
    assert "(c >> 1) | ((g & 1) << 1)" in text and "xs[nt * 128 + (i ^ sw)]" in text
    for name in mg.skinny_kernel_names():
        tw, wk, nt = (int(v) for v in re.findall(r"\d+", name))
        assert f"HR_MS_KERNEL({tw}, {wk}, {nt})" in text
        assert tw * wk * 32 == mg.SKINNY_THREADS


def test_chunks() -> None:
    assert mg.skinny_chunks(9) == [(0, 9, 4)]
    assert mg.skinny_chunks(32) == [(0, 32, 4)]
    assert mg.skinny_chunks(33) == [(0, 33, 8)]
    assert mg.skinny_chunks(100) == [(0, 64, 8), (64, 36, 8)]
    assert mg.skinny_chunks(150) == [(0, 64, 8), (64, 64, 8), (128, 22, 4)]
    assert mg.skinny_chunks(256) == [(64 * i, 64, 8) for i in range(4)]
    for m in range(1, 300):
        chunks = mg.skinny_chunks(m)
        assert len(chunks) == -(-m // 64)  # one pass over the weight per 64 rows
        assert sum(rows for _, rows, _ in chunks) == m
        assert all(
            rows <= 8 * nt and (nt, rows > 32) in ((8, True), (4, False)) for _, rows, nt in chunks
        )


def test_rule_on_llama_shapes() -> None:
    picks = {
        (n, k): mg.skinny_choose(n, k, 8, 132)
        for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
        + [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]
    }
    assert picks == {
        (6144, 4096): (2, 4, 8),  # 384 tiles: 96 blocks of 4 would fill 73% of the SMs
        (4096, 4096): (2, 4, 8),
        (28672, 4096): (8, 1, 8),
        (4096, 14336): (2, 4, 8),
        (10240, 8192): (4, 2, 8),  # 160 blocks
        (8192, 8192): (4, 2, 8),  # 128 blocks: 97% of the SMs
        (57344, 8192): (8, 1, 8),  # 448 blocks of 8 tiles
        (8192, 28672): (4, 2, 8),
    }
    assert mg.skinny_choose(16, 512, 4, 132) == (4, 2, 4)  # 4 k-blocks: 2 slices, not 4
    assert mg.skinny_choose(16, 384, 4, 132) == (8, 1, 4)  # 3 k-blocks: one slice
    assert mg.skinny_choose(16, 128, 8, 132) == (8, 1, 8)  # 1 k-block: one slice
    assert "64 rows t8_w1_n8 x 448 blocks; 36 rows t8_w1_n8" in mg.skinny_explain(57344, 8192, 100)


def test_shared_memory_fits() -> None:
    for tw, wk, nt in mg.SKINNY_VARIANTS:
        nbytes = mg.skinny_shmem(tw, wk, nt)
        assert nbytes >= 2 * wk * 8 * nt * 256 and nbytes >= (wk > 1) * 8 * 32 * nt * 4 * 4
        blocks = 2 if nt == 4 else 1  # HR_MS_MIN_BLOCKS
        assert blocks * (nbytes + 1024) <= 228 * 1024, (tw, wk, nt, nbytes)


def _record(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    monkeypatch.setattr(mg, "_kernel", lambda dtype, name: name)
    monkeypatch.setattr(ig, "_kernel", lambda dtype, name: name)
    monkeypatch.setattr(v4, "_kernel", lambda dtype, name: name)
    monkeypatch.setattr(mg, "_sms", lambda device: 132)
    monkeypatch.setattr(v4, "_sms", lambda device: 132)
    monkeypatch.setattr(mg, "_device_index", lambda device: 0)
    monkeypatch.setattr(v4, "_device_index", lambda device: 0)
    monkeypatch.setattr(compiler, "allow_shared_memory", lambda kernel, nbytes, index: None)
    monkeypatch.setattr(
        compiler, "launch", lambda *c, shmem=0, pdl=False: calls.append((*c[:3], shmem, c[3:]))
    )
    return calls


@pytest.mark.parametrize("m", [9, 33, 64, 100, 150, 256])
def test_skinny_launch_arguments(monkeypatch: pytest.MonkeyPatch, m: int) -> None:
    calls = _record(monkeypatch)
    monkeypatch.setattr(ig, "GEMV_IMPL", "v4")
    n, k = 8192, 1024
    w = weight(n, k, 128, seed=3)
    x = torch.randn(m, k + 8, dtype=torch.bfloat16)[:, :k].as_subclass(_OnDevice)  # strided
    y = torch.empty(m, n, dtype=torch.bfloat16)
    assert ig.int4_linear(x, w, out=y) is y
    text = mg.source()
    macro = text[text.index("#define HR_MW_ARGS") : text.index("#define HR_MW_PASS")]
    signature = kernel_parameters(macro + '\nextern "C" __global__ void s(HR_MW_ARGS) {}\n')["s"]
    chunks = mg.skinny_chunks(m)
    assert len(calls) == len(chunks)
    for (kernel, grid, block, shmem, args), (r, rows, nt) in zip(calls, chunks, strict=True):
        tw, wk, _ = mg.skinny_choose(n, k, nt, 132)
        assert (kernel, tuple(grid), block) == (
            mg.skinny_kernel_name(tw, wk, nt),
            (n // (16 * tw),),
            256,
        )
        assert shmem == mg.skinny_shmem(tw, wk, nt)
        assert [type(a) for a in args] == [t for _, t in signature]
        got = dict(zip([name for name, _ in signature], args, strict=True))
        assert got["x"] == x.data_ptr() + r * (k + 8) * 2 and got["x_stride"] == k + 8
        assert got["y"] == y.data_ptr() + r * n * 2 and got["y_stride"] == n
        assert (got["N"], got["K"], got["group_size"], got["M"]) == (n, k, 128, rows)
        assert got["lo_mask"] == 0x000F000F


def _counting_dequantize(seen: list[int]) -> Any:
    def dequantize(w: ig.Int4Weight, dtype: torch.dtype, out: Any = None) -> torch.Tensor:
        seen.append(1)
        return ig.dequantize_ref(w, dtype)

    return dequantize


@pytest.fixture(autouse=True)
def wide_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """int4_linear's skinny path on its widest bounds, 9..256 rows (HEADRACE_INT4_SKINNY_MIN=9,
    _MAX=256), so the tests reach every launch shape; the defaults (17..32) have their own."""
    monkeypatch.setattr(ig, "SKINNY_MIN_ROWS", 9)
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 256)


def test_default_bounds_take_17_to_32_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The skinny defaults: 16 rows stay two GEMV launches, 17..32 one skinny, 33+ dequantize
    with the tiled GEMM off (tests/test_int4_tiled.py checks its default 33..64)."""
    monkeypatch.setattr(ig, "SKINNY_MIN_ROWS", 17)
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 32)
    monkeypatch.setattr(ig, "TILED_MAX_ROWS", 0)
    calls = _record(monkeypatch)
    dq: list[int] = []
    monkeypatch.setattr(ig, "dequantize", _counting_dequantize(dq))
    monkeypatch.setattr(ig, "GEMV_IMPL", "v4")
    w = weight(64, 512, 128, seed=4)

    def run(m: int) -> list[str]:
        calls.clear()
        dq.clear()
        x = torch.randn(m, 512, dtype=torch.bfloat16).as_subclass(_OnDevice)
        ig.int4_linear(x, w, out=torch.empty(m, 64, dtype=torch.bfloat16))
        return _names(calls) + ["dequant"] * len(dq)

    assert run(16) == ["mma_gemv_w4_u2_pf"] * 2
    assert run(17) == run(32) == ["mma_skinny_t4_w2_n4"]
    assert run(33) == run(150) == ["dequant"]


def _names(calls: list[Any]) -> list[str]:
    return [c[0] for c in calls]


def test_dispatch_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """rows layout, "v4"/"mma", bounds 9..256: 1..8 one GEMV; 9..256 skinny; more:
    dequantize + cuBLAS (the defaults, 17..32, are narrower: test_env_switches)."""
    monkeypatch.setattr(ig, "TILED_MAX_ROWS", 0)  # its own tests: tests/test_int4_tiled.py
    calls = _record(monkeypatch)
    w = weight(64, 512, 128, seed=4)
    dq: list[int] = []
    monkeypatch.setattr(ig, "dequantize", _counting_dequantize(dq))

    def run(m: int) -> list[str]:
        calls.clear()
        dq.clear()
        x = torch.randn(m, 512, dtype=torch.bfloat16).as_subclass(_OnDevice)
        ig.int4_linear(x, w, out=torch.empty(m, 64, dtype=torch.bfloat16))
        return _names(calls) + ["dequant"] * len(dq)

    for impl in ("v4", "mma"):
        monkeypatch.setattr(ig, "GEMV_IMPL", impl)
        assert run(8) == ["mma_gemv_w4_u2_pf"]
        assert run(9) == run(32) == ["mma_skinny_t4_w2_n4"]  # 4 tiles, 4 k-blocks
        assert run(150) == ["mma_skinny_t4_w2_n8"] * 2 + ["mma_skinny_t4_w2_n4"]
        assert run(256) == ["mma_skinny_t4_w2_n8"] * 4
        assert run(257) == ["dequant"]
    # HEADRACE_INT4_SKINNY_MIN=33: 9..32 rows stay on the 8-row GEMV launches
    monkeypatch.setattr(ig, "SKINNY_MIN_ROWS", 33)
    assert run(20) == ["mma_gemv_w4_u2_pf"] * 3
    assert run(33)[0].startswith("mma_skinny_")
    # HEADRACE_INT4_SKINNY_MAX=0: today's behaviour exactly (GEMVs up to 32 rows, then dequantize)
    monkeypatch.setattr(ig, "SKINNY_MIN_ROWS", 9)
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 0)
    assert run(20) == ["mma_gemv_w4_u2_pf"] * 3
    assert run(32) == ["mma_gemv_w4_u2_pf"] * 4
    assert run(33) == run(150) == ["dequant"]
    # "old" / "split" never take it
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 256)
    monkeypatch.setattr(ig, "GEMV_IMPL", "old")
    assert run(20) == ["dequant"]


def test_unsupported_shapes_take_the_old_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Group 64 (a k-block would span two groups) and K % 128: no skinny launch."""
    calls = _record(monkeypatch)
    monkeypatch.setattr(ig, "GEMV_IMPL", "v4")
    monkeypatch.setattr(mg, "skinny", lambda *a, **k: pytest.fail("skinny on an unsupported shape"))
    monkeypatch.setattr(ig, "dequantize", lambda w, dtype, out=None: ig.dequantize_ref(w, dtype))
    for n, k, group_size in ((100, 256, 64), (64, 576, 576)):
        w = weight(n, k, group_size, seed=5)
        x = torch.randn(40, k, dtype=torch.bfloat16).as_subclass(_OnDevice)
        ig.int4_linear(x, w)
    assert calls == []  # dequantized (the patched reference), nothing launched


def test_stream_layout_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream layout: 9..256 rows run v4_skinny_* (its launches as round 3's), unless
    HEADRACE_INT4_SKINNY_STREAM=0 or _MAX=0 (then GEMVs up to 32 rows, then dequantize)."""
    monkeypatch.setattr(ig, "TILED_MAX_ROWS", 0)  # its own tests: tests/test_int4_tiled.py
    calls = _record(monkeypatch)
    monkeypatch.setattr(ig, "GEMV_IMPL", "v4")
    monkeypatch.setattr(mg, "skinny", lambda *a, **k: pytest.fail("round 3 on a stream weight"))
    seen: list[int] = []
    monkeypatch.setattr(ig, "dequantize", _counting_dequantize(seen))
    n, k = 4096, 1024
    w = weight(n, k, 64, seed=6).as_stream()  # groups of 64: the stream kernels take them

    def run(m: int) -> list[str]:
        calls.clear()
        seen.clear()
        x = torch.randn(m, k + 8, dtype=torch.bfloat16)[:, :k].as_subclass(_OnDevice)
        y = torch.empty(m, n, dtype=torch.bfloat16)
        ig.int4_linear(x, w, out=y)
        for (_kernel, _grid, _block, shmem, args), (r, rows, nt) in zip(
            calls, mg.skinny_chunks(m), strict=False
        ):
            if _kernel.startswith("v4_skinny_"):
                assert args[0] == x.data_ptr() + r * (k + 8) * 2 and args[-2] == rows
                assert args[-3] == 6  # group_shift of 64
                assert shmem == mg.skinny_shmem(*mg.skinny_choose(n, k, nt, 132))
        return _names(calls) + ["dequant"] * len(seen)

    assert len(run(8)) == 1 and run(8)[0].startswith("v4_gemv_")
    assert run(9) == ["v4_skinny_t2_w4_n4"]  # 256 tiles: 128 blocks of 2
    assert run(150) == ["v4_skinny_t2_w4_n8"] * 2 + ["v4_skinny_t2_w4_n4"]
    assert run(257) == ["dequant"]
    monkeypatch.setattr(ig, "SKINNY_STREAM", False)
    assert len(run(20)) == 3 and all(c.startswith("v4_gemv_") for c in run(20))
    assert run(33) == ["dequant"]
    monkeypatch.setattr(ig, "SKINNY_STREAM", True)
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 0)
    assert run(33) == ["dequant"]


def test_tiles_layout_keeps_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    _record(monkeypatch)
    monkeypatch.setattr(mg, "skinny", lambda *a, **k: pytest.fail("skinny on a tiles weight"))
    monkeypatch.setattr(v4, "skinny", lambda *a, **k: pytest.fail("skinny on a tiles weight"))
    seen: list[int] = []
    monkeypatch.setattr(ig, "dequantize", _counting_dequantize(seen))
    w = weight(64, 512, 128, seed=6).as_tiles()
    x = torch.randn(40, 512, dtype=torch.bfloat16).as_subclass(_OnDevice)
    ig.int4_linear(x, w)
    assert seen == [1]


def test_env_switches() -> None:
    def read(**extra: str) -> str:
        names = ("SKINNY_MIN_ROWS", "SKINNY_MAX_ROWS")
        return read_switches(names, "HEADRACE_INT4_SKINNY", **extra)

    assert read() == "17 32"  # the rows where the H200 measured it faster (int4_gemm.py)
    assert read(HEADRACE_INT4_SKINNY_MAX="0") == "17 0"
    assert read(HEADRACE_INT4_SKINNY_MIN="33", HEADRACE_INT4_SKINNY_MAX="128") == "33 128"
    assert (
        read(HEADRACE_INT4_SKINNY_MIN="2", HEADRACE_INT4_SKINNY_MAX="256") == "9 256"
    )  # 1..8: GEMV


# The sm_90 compile check (spill-free, registers): tests/test_kernels_compile.py's
# test_int4_mma_skinny_compiles_for_sm90.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "n", "k", "group_size", "shape"),
    [
        (9, 48, 512, 64, (8, 1)),  # 3 tiles, 5 past N / 16 re-read the last; groups of 64
        (33, 32, 1024, 128, (4, 2)),  # 5 tiles at NT = 8, the last of one row
        (64, 16, 384, 128, (2, 4)),  # 3 k-blocks over 4 slices: slice 3 empty
        (100, 32, 768, 256, (4, 2)),  # 64 + 36 rows
        (20, 64, 256, 256, (2, 4)),  # NT = 4
    ],
)
def test_emulated_stream_skinny_equals_reference(
    dtype: torch.dtype, m: int, n: int, k: int, group_size: int, shape: tuple[int, int]
) -> None:
    from tests.int4_v4_emulation import emulate_skinny as emulate_stream

    w = weight(n, k, group_size, seed=m + n + k, zmax=16).as_stream()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(dtype)
    got = emulate_stream(x, w, shape)
    ref = ig.int4_linear_ref(x.double(), w).numpy()
    assert not np.isnan(got).any(), "an output element was not written (or NaN x was read)"
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_stream_emulation_catches_a_wrong_swizzle() -> None:
    from tests import int4_v4_emulation as ve

    w = weight(16, 256, 128, seed=2).as_stream()
    x = torch.randn(16, 256).to(torch.bfloat16)
    ref = ig.int4_linear_ref(x.double(), w).numpy()
    real = ve.stage_swizzle
    try:  # the lanes read unswizzled (the stage, 2-d rows, still swizzles)
        ve.stage_swizzle = lambda row: real(row) if row.ndim == 2 else 0 * row
        got = ve.emulate_skinny_launch(x, w, (8, 1, 4))
    finally:
        ve.stage_swizzle = real
    assert np.abs(got - ref).max() > 1e-3 * np.abs(ref).max()


def test_stream_source_has_the_emulated_swizzle() -> None:
    text = v4.source()
    assert "(e ^ ((row & 1) << 2))" in text and "swz = (g & 1) << 2" in text
    assert "((4 * (2 * j + i2) + c) ^ swz)" in text
    for name in v4.skinny_kernel_names():
        tw, wk, nt = (int(d) for d in re.findall(r"\d+", name.removeprefix("v4_")))
        assert f"HR_VS_KERNEL({tw}, {wk}, {nt})" in text
