"""The tensor-core int4 GEMV (cuda/int4_mma_gemv.*) on CPU: its fragment math emulated lane
by lane against the reference, the rule, launch arguments, fallbacks, and sm_90 compiles."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

from cuda import compiler
from cuda import int4_gemm as ig
from cuda import int4_mma_gemv as mg
from tests.int4_mma_emulation import emulate
from tests.test_cuda_launch_args import _OnDevice, kernel_parameters


def weight(n: int, k: int, group_size: int, seed: int, zmax: int = 16) -> ig.Int4Weight:
    g = torch.Generator().manual_seed(seed)
    return ig.Int4Weight(
        qw=ig.pack_rows(torch.randint(0, 16, (n, k), generator=g)),
        scales=(torch.rand(n, k // group_size, generator=g) * 0.02 + 0.001).half(),
        zeros=torch.randint(0, zmax + 1, (n, k // group_size), generator=g).to(torch.uint8),
        group_size=group_size,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "n", "k", "group_size", "wk"),
    [(1, 16, 128, 128, 4), (3, 40, 512, 128, 4), (8, 32, 512, 256, 8), (5, 24, 1024, 1024, 4)],
)
def test_emulated_kernel_equals_reference(
    dtype: torch.dtype, m: int, n: int, k: int, group_size: int, wk: int
) -> None:
    # zeros up to 16: GPTQ's stored zero + 1 can be 16; partial tiles (n % 16), empty warps.
    w = weight(n, k, group_size, seed=m + n + k, zmax=16)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    got = emulate(x, w, wk)
    ref = ig.int4_linear_ref(x.double(), w).numpy()
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zero_constants_are_the_float_values(dtype: torch.dtype) -> None:
    from tests.int4_mma_emulation import halves, zero_consts

    z = np.arange(17, dtype=np.float64)  # GPTQ's stored zero + 1 reaches 16
    lo, hi = zero_consts(z, dtype)
    magic = 1024.0 if dtype == torch.float16 else 128.0
    np.testing.assert_array_equal(halves(lo, dtype), np.stack([-(magic + z)] * 2, -1))
    if dtype == torch.float16:
        np.testing.assert_array_equal(halves(hi, dtype), np.stack([-(magic / 16 + z)] * 2, -1))
    text = mg.source()
    for const in ("0xC300C300u", "0xE400E400u", "0xD400D400u", "0x00010001u", "0x00100010u"):
        assert const in text


def test_emulation_catches_a_wrong_pairing() -> None:
    """The check has teeth: pairing x as (0, 1) instead of (0, 4) breaks the result."""
    from tests import int4_mma_emulation as em

    w = weight(16, 128, 128, seed=1)
    x = torch.randn(1, 128).to(torch.bfloat16)
    real = em.byte_perm
    try:
        em.byte_perm = lambda a, b, s: real(a, a, 0x3210) if s == 0x5410 else real(b, b, 0x3210)
        got = emulate(x, w, 4)
    finally:
        em.byte_perm = real
    ref = ig.int4_linear_ref(x.double(), w).numpy()
    assert np.abs(got - ref).max() > 1e-3 * np.abs(ref).max()


def test_source_has_the_emulated_constants() -> None:
    text = mg.source()
    for const in ("0x43004300u", "0x64006400u", "0x3F803F80u", "0x3C003C00u", "0x2C002C00u"):
        assert const in text
    for sel in ("0x5410", "0x7632", "lo << 4", "& lo) | MW_MAGIC"):
        assert sel in text
    assert mg.LO_MASK == 0x000F000F


def test_rule_on_llama_shapes() -> None:
    # The most warps a block that still runs in one wave (tiles <= 132 x 32 / WK); too
    # tall for one wave: 4. Always U = 2 with the prefetch.
    picks = {
        (n, k): mg.choose(n, k, 132)[0]
        for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
        + [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]
    }
    assert picks == {
        (6144, 4096): 8,  # 384 tiles: 16 warps would need 1.45 waves
        (4096, 4096): 16,
        (28672, 4096): 4,
        (4096, 14336): 16,
        (10240, 8192): 4,
        (8192, 8192): 8,
        (57344, 8192): 4,
        (8192, 28672): 8,
    }
    assert {mg.choose(n, 4096, 132)[1:] for n in (16, 4096, 28672)} == {(2, 1)}
    assert mg.choose(16, 128, 132)[0] == 4  # one k-block: the fewest warps
    assert mg.choose(64, 1024, 132)[0] == 8  # at most one warp per k-block
    assert all(mg.choose(n, 4096, 132) in mg.VARIANTS for n in (16, 1000, 4096, 10**5))


def test_supported_shapes() -> None:
    assert mg.supported(4096, 4096, 128) and mg.supported(40, 14336, 14336)
    assert not mg.supported(4096, 4096, 64)  # a k-block would span two groups
    assert not mg.supported(4096, 576, 576)  # K % 128


def test_forced_variant() -> None:
    assert mg.forced_variant("") is None and mg.forced_variant("w16_u2") == (16, 2, 0)
    assert mg.forced_variant("w4_u4_pf") == (4, 4, 1) and mg.label((4, 4, 1)) == "w4_u4_pf"
    with pytest.raises(ValueError, match="HEADRACE_INT4_MMA_VARIANT"):
        mg.forced_variant("w3_u2")


@pytest.mark.parametrize(("m", "n", "k"), [(1, 4096, 4096), (8, 100, 512), (20, 48, 14336)])
def test_mma_launch_arguments(monkeypatch: pytest.MonkeyPatch, m: int, n: int, k: int) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(mg, "_kernel", lambda dtype, name: name)
    monkeypatch.setattr(mg, "_sms", lambda device: 132)
    monkeypatch.setattr(ig, "GEMV_IMPL", "mma")
    # 9..32 rows as 8-row GEMVs, as before the skinny GEMM (tests/test_int4_skinny.py)
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 0)
    monkeypatch.setattr(compiler, "launch", lambda *c, shmem=0: calls.append(c))
    w = weight(n, k, 128, seed=3)
    x = torch.randn(m, k + 8, dtype=torch.bfloat16)[:, :k].as_subclass(_OnDevice)  # strided
    y = torch.empty(m, n, dtype=torch.bfloat16)
    assert ig.int4_linear(x, w, out=y) is y
    text = mg.source()
    macro = text[text.index("#define HR_MW_ARGS") : text.index("#define HR_MW_PASS")]
    signature = kernel_parameters(macro + '\nextern "C" __global__ void s(HR_MW_ARGS) {}\n')["s"]
    wk, u, pf = mg.choose(n, k, 132)
    name = f"mma_gemv_w{wk}_u{u}" + ("_pf" if pf else "")
    assert len(calls) == -(-m // 8)
    for i, (kernel, grid, block, *args) in enumerate(calls):
        assert (kernel, tuple(grid), block) == (name, (-(-n // 16),), wk * 32)
        assert [type(a) for a in args] == [t for _, t in signature]
        got = dict(zip([name for name, _ in signature], args, strict=True))
        assert got["x"] == x.data_ptr() + 8 * i * (k + 8) * 2 and got["x_stride"] == k + 8
        assert got["y"] == y.data_ptr() + 8 * i * n * 2 and got["y_stride"] == n
        assert (got["N"], got["K"], got["group_size"], got["M"]) == (n, k, 128, min(8, m - 8 * i))
        assert got["lo_mask"] == 0x000F000F


def test_unsupported_group_falls_back_to_old(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(ig, "_kernel", lambda dtype, name: name)
    monkeypatch.setattr(ig, "GEMV_IMPL", "mma")
    monkeypatch.setattr(compiler, "launch", lambda *c, shmem=0: calls.append(c))
    w = weight(100, 256, 64, seed=4)
    x = torch.randn(2, 256, dtype=torch.bfloat16).as_subclass(_OnDevice)
    ig.int4_linear(x, w, out=torch.empty(2, 100, dtype=torch.bfloat16))
    assert [c[0] for c in calls] == ["gemv_m2"]


def test_more_than_32_rows_dequantize(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ig, "GEMV_IMPL", "mma")
    monkeypatch.setattr(mg, "gemv", lambda *a, **k: pytest.fail("GEMV for 33 rows"))
    w = weight(32, 256, 128, seed=5)
    x = torch.randn(33, 256)
    torch.testing.assert_close(ig.int4_linear(x, w), ig.int4_linear_ref(x, w))


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_mma_gemv_compiles_for_sm90(dtype_name: str) -> None:
    from tests.test_kernels_compile import _check_log

    cubin, log = compiler.compile_cubin(
        mg.source(),
        arch="sm_90",
        defines=mg.module_defines(getattr(torch, dtype_name)),
        name="int4_mma_gemv",
        verbose_ptxas=True,
        use_cache=False,
    )
    for name in mg.kernel_names():
        assert f"Compiling entry function '{name}'" in log and name.encode() in cubin
    _check_log(log)
    assert "0 bytes spill stores" in log and not re.search(r"[1-9]\d* bytes spill", log), log
    regs = dict(re.findall(r"entry function '(\w+)'.*?Used (\d+) registers", log, re.S))
    assert set(regs) == set(mg.kernel_names()) | set(mg.skinny_kernel_names())
    regs = {name: regs[name] for name in mg.kernel_names()}  # the skinny GEMM: test_int4_skinny.py
    # U = 2 keeps 32 warps resident an SM (<= 64 registers); nothing over 128.
    assert all(int(r) <= (64 if name.endswith("_u2") else 128) for name, r in regs.items()), regs


def test_rule_explains_its_pick() -> None:
    """The line bench_int4_v4.py prints beside each shape's measured variants: 8B o, the
    open case (w16_u2_pf by the rule; w8_u4 was faster by events in session 6)."""
    assert mg.explain(4096, 4096, 132) == (
        "w16_u2_pf: 256 tiles x 16 warps = 0.97 waves of 132 x 32 warps, 2 k-blocks a warp"
    )
    assert mg.explain(28672, 4096, 132).startswith("w4_u2_pf: 1792 tiles x 4 warps = 1.70 waves")
