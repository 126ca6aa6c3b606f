"""The tiled W4A16 GEMM (cuda/int4_tiled_gemm.cu, issue 14; rows and stream layouts) on CPU: its scale-folded
dequantization bit for bit against the reference's rounding, its fragment math, staging and
K splits emulated lane by lane against the reference on awkward shapes, the split rule,
launch arguments, int4_linear's dispatch and HEADRACE_INT4_TILED_MAX. The sm_90 compile
check (spill-free) is tests/test_kernels_compile.py's test_int4_tiled_gemm_compiles_for_sm90."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

from cuda import compiler
from cuda import int4_gemm as ig
from cuda import int4_mma_gemv as mg
from cuda import int4_tiled_gemm as tg
from cuda import int4_v4_gemv as v4
from tests import int4_tiled_emulation as em
from tests.int4_gemm_cases import read_switches
from tests.int4_mma_emulation import halves
from tests.test_cuda_launch_args import _OnDevice, kernel_parameters
from tests.test_int4_mma_gemv import weight


def _rounded_ref(x: torch.Tensor, w: ig.Int4Weight) -> np.ndarray:
    """x W^T in float64 with W rounded to x's dtype, as dequantize_ref (and the kernel's A)."""
    return (x.double() @ ig.dequantize_ref(w, x.dtype).double().T).numpy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folded_dequant_is_the_references_rounding(dtype: torch.dtype) -> None:
    """A = round((q - z) s) from the LOP3 / FMA2 chain equals ((q - z) s).to(dtype) bit for
    bit for every nibble and zero point (0..16) and 4096 fp16 scales (subnormal to 8)."""
    g = torch.Generator().manual_seed(0)
    s = torch.cat([torch.rand(4000, generator=g) * 0.05, torch.rand(96, generator=g) * 8])
    s = torch.cat([s[:-8], torch.tensor([6e-8, 1e-5, 2**-14, 0.0, 1.0, 0.5, 3.0, 7.99])]).half()
    for z in range(17):
        for q in range(16):
            word = np.full(s.numel(), sum(q << (4 * j) for j in range(8)), dtype=np.uint32)
            consts = em.chan_consts(s.numpy(), np.full(s.numel(), z), dtype)
            got = halves(np.stack(em.dequant(word, consts, dtype)), dtype)  # [4, n, 2]
            want = ((q - z) * s.float()).to(dtype).double().numpy()
            assert (got == want[None, :, None]).all(), (dtype, q, z)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "n", "k", "group_size", "splits"),
    [
        (33, 40, 256, 128, None),  # 5 B tiles, the last of one row; 8 warps, 5.5 past N
        (70, 300, 384, 64, 3),  # 2 row blocks (64 + 6); N % 16 = 12; groups of 64; 3 splits
        (100, 257, 512, 32, 2),  # 2 channel blocks, one channel in the second; groups of 32
        (64, 16, 640, 640, 4),  # 5 k-blocks over 4 splits: trimmed to 3 (2, 2, 1), no empty one
        (9, 24, 128, 128, None),  # one B tile of 8 + 1 rows
    ],
)
def test_emulated_tiled_equals_reference(
    dtype: torch.dtype, m: int, n: int, k: int, group_size: int, splits: int | None
) -> None:
    w = weight(n, k, group_size, seed=m + n + k, zmax=16)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(dtype)
    got = em.emulate(x, w, splits)
    assert not np.isnan(got).any(), "an output element was not written (or NaN x was read)"
    ref = _rounded_ref(x, w)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    # and within the GPU tests' bound against the fp32 reference (tests/gpu/int4_helpers.check)
    fp32 = ig.int4_linear_ref(x.float(), w).double().numpy()
    base = np.abs(ig.int4_linear_ref(x, w).double().numpy() - fp32).max()
    assert np.abs(got - fp32).max() <= 2 * base + 1e-3 * np.abs(fp32).max()


def test_emulation_catches_a_wrong_swizzle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check has teeth: a stage that drops the row-parity bit of the swizzle (the reader
    keeps it) puts other rows' x where the lanes read and breaks the result."""
    w = weight(32, 256, 128, seed=2)
    x = torch.randn(16, 256).to(torch.bfloat16)
    ref = _rounded_ref(x, w)

    def no_parity(row: np.ndarray, ch: np.ndarray) -> np.ndarray:
        c, i = ch >> 2, ch & 3
        return row * 16 + 4 * c + (i ^ (c >> 1))

    monkeypatch.setattr(em, "slot", no_parity)
    got = em.emulate(x, w)
    assert np.isnan(got).any() or not np.allclose(got, ref, rtol=1e-3)


def test_source_has_the_emulated_swizzle() -> None:
    text = tg.source()
    assert "row * 16 + 4 * c + (i ^ ((c >> 1) | ((row & 1) << 1)))" in text
    assert "const int sw = (c >> 1) | ((g & 1) << 1);" in text
    assert f"#define TG_STAGES {tg.STAGES}" in text
    assert "return row * 16 + (ch ^ ((row & 1) << 2));" in text  # the stream layout's
    assert "xs[nt * 128 + ((4 * p + c) ^ ((g & 1) << 2))]" in text


def test_split_rule_on_llama_shapes() -> None:
    picks = {
        (n, k, m): tg.choose_splits(n, k, m, 132)
        for n, k in [(28672, 4096), (4096, 14336), (57344, 8192), (8192, 28672)]
        for m in (64, 256)
    }
    assert picks == {
        (28672, 4096, 64): (1, 32),  # 112 blocks: 85% of the SMs, no split
        (28672, 4096, 256): (1, 32),
        (4096, 14336, 64): (7, 16),  # 16 blocks x 7 splits of 16 k-blocks
        (4096, 14336, 256): (2, 56),  # 4 row blocks x 16 x 2
        (57344, 8192, 64): (1, 64),  # 224 blocks
        (57344, 8192, 256): (1, 64),
        (8192, 28672, 64): (4, 56),
        (8192, 28672, 256): (1, 224),  # 4 x 32 = 128 blocks
    }
    for n, k, m in [(16, 128, 33), (16, 640, 64), (100, 1152, 512), (4096, 512, 40)]:
        s, per = tg.choose_splits(n, k, m, 132)
        assert 1 <= s <= tg.MAX_SPLITS and (s - 1) * per < k // tg.KB <= s * per  # none empty
    assert tg.explain(4096, 14336, 64) == "1x16x7 blocks, 16 k-blocks a split + reduce"


def test_shared_memory_fits() -> None:
    assert tg.SHMEM == (2 * tg.STAGES + 2) * 16 * 1024
    assert tg.SHMEM + 1024 <= 228 * 1024 and tg.SHMEM <= 227 * 1024  # one block an SM


def _record(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    for mod in (mg, ig, v4, tg):
        monkeypatch.setattr(mod, "_kernel", lambda dtype, name: name)
    for mod in (mg, v4, tg):
        monkeypatch.setattr(mod, "_sms", lambda device: 132)
        monkeypatch.setattr(mod, "_device_index", lambda device: 0)
    monkeypatch.setattr(compiler, "allow_shared_memory", lambda kernel, nbytes, index: None)
    monkeypatch.setattr(
        compiler, "launch", lambda *c, shmem=0, pdl=False: calls.append((*c[:3], shmem, c[3:]))
    )
    return calls


@pytest.mark.parametrize(
    ("m", "n", "k"), [(64, 57344, 1024), (100, 4096, 14336), (512, 8192, 1024)]
)
def test_launch_arguments(monkeypatch: pytest.MonkeyPatch, m: int, n: int, k: int) -> None:
    calls = _record(monkeypatch)
    w = weight(n, k, 128, seed=3)
    x = torch.randn(m, k + 8, dtype=torch.bfloat16)[:, :k].as_subclass(_OnDevice)  # strided
    y = torch.empty(m, n, dtype=torch.bfloat16)
    tg.gemm(x, w, y)
    text = tg.source()
    macro = text[text.index("#define HR_TG_ARGS") : text.index("// Stage k-block")]
    sig = kernel_parameters(macro + '\nextern "C" __global__ void s(HR_TG_ARGS) {}\n')["s"]
    s, per = tg.choose_splits(n, k, m, 132)
    assert len(calls) == (2 if s > 1 else 1)
    kernel, grid, block, shmem, args = calls[0]
    assert (kernel, tuple(grid), block, shmem) == (
        "tiled_gemm",
        (-(-m // 64), -(-n // 256), s),
        256,
        tg.SHMEM,
    )
    assert [type(a) for a in args] == [t for _, t in sig]
    got = dict(zip([name for name, _ in sig], args, strict=True))
    assert got["x"] == x.data_ptr() and got["x_stride"] == k + 8
    assert got["y"] == y.data_ptr() and got["y_stride"] == n
    assert (got["N"], got["K"], got["group_size"], got["M"], got["per"]) == (n, k, 128, m, per)
    assert got["lo_mask"] == 0x000F000F and (got["ws"] != 0) == (s > 1)
    if s > 1:
        red = kernel_parameters(text)["tiled_reduce"]
        kernel, grid, block, shmem, args = calls[1]
        assert (kernel, block, shmem) == ("tiled_reduce", 256, 0)
        assert [type(a) for a in args] == [t for _, t in red]
        assert args[0] == got["ws"] and list(args[1:]) == [y.data_ptr(), n, m, n, s]


def _counting_dequantize(seen: list[int]) -> Any:
    def dequantize(w: ig.Int4Weight, dtype: torch.dtype, out: Any = None) -> torch.Tensor:
        seen.append(1)
        return ig.dequantize_ref(w, dtype)

    return dequantize


def _runner(monkeypatch: pytest.MonkeyPatch, w: ig.Int4Weight) -> Any:
    calls = _record(monkeypatch)
    seen: list[int] = []
    monkeypatch.setattr(ig, "dequantize", _counting_dequantize(seen))
    k, n = w.in_features, w.out_features

    def run(m: int) -> list[str]:
        calls.clear()
        seen.clear()
        x = torch.randn(m, k, dtype=torch.bfloat16).as_subclass(_OnDevice)
        ig.int4_linear(x, w, out=torch.empty(m, n, dtype=torch.bfloat16))
        return [c[0] for c in calls] + ["dequant"] * len(seen)

    return run


def test_off_by_default_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """TILED_MAX_ROWS = 0: the GEMVs up to 32 rows, skinny 17..32, dequantize past."""
    monkeypatch.setattr(ig, "TILED_MAX_ROWS", 0)
    monkeypatch.setattr(ig, "SKINNY_MIN_ROWS", 17)
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 32)
    monkeypatch.setattr(tg, "gemm", lambda *a, **k: pytest.fail("tiled while off"))
    run = _runner(monkeypatch, weight(64, 512, 128, seed=4))
    for impl in ("v4", "mma", "old"):
        monkeypatch.setattr(ig, "GEMV_IMPL", impl)
        assert run(33) == run(100) == run(512) == ["dequant"]
    monkeypatch.setattr(ig, "GEMV_IMPL", "v4")
    assert run(16) == ["mma_gemv_w4_u2_pf"] * 2 and run(32) == ["mma_skinny_t4_w2_n4"]


def test_default_bound_is_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default TILED_MAX_ROWS = 64: 33..64 rows one tiled launch, 65 dequantize."""
    monkeypatch.setattr(ig, "TILED_MAX_ROWS", 64)
    monkeypatch.setattr(ig, "SKINNY_MIN_ROWS", 17)
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 32)
    monkeypatch.setattr(ig, "GEMV_IMPL", "v4")
    run = _runner(monkeypatch, weight(64, 512, 128, seed=4))
    assert run(32) == ["mma_skinny_t4_w2_n4"]
    assert run(33) == run(64) == ["tiled_gemm"]
    assert run(65) == run(100) == ["dequant"]


def test_dispatch_when_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """HEADRACE_INT4_TILED_MAX=512: 33..512 rows one tiled launch (+ reduce where it splits),
    513 dequantize; 1..32 as before; past wider skinny bounds only; "old" never."""
    monkeypatch.setattr(ig, "TILED_MAX_ROWS", 512)
    monkeypatch.setattr(ig, "SKINNY_MIN_ROWS", 17)
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 32)
    monkeypatch.setattr(ig, "GEMV_IMPL", "v4")
    run = _runner(monkeypatch, weight(64, 512, 128, seed=4))  # 1 block: 4 k-blocks, 1 split
    assert run(8) == ["mma_gemv_w4_u2_pf"] and run(32) == ["mma_skinny_t4_w2_n4"]
    assert run(33) == run(100) == run(512) == ["tiled_gemm"]
    assert run(513) == ["dequant"]
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 64)
    assert run(64) == ["mma_skinny_t4_w2_n8"] and run(65) == ["tiled_gemm"]
    monkeypatch.setattr(ig, "GEMV_IMPL", "old")
    assert run(100) == ["dequant"]
    monkeypatch.setattr(ig, "GEMV_IMPL", "mma")
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 32)
    big = _runner(monkeypatch, weight(4096, 2048, 128, seed=5))  # 16 blocks: splits of 4
    assert big(40) == ["tiled_gemm", "tiled_reduce"]


def test_group_64_and_odd_k(monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups of 64 / 32 (no skinny: a k-block spans groups) take the tiled GEMM when on;
    K % 128 != 0 keeps the old path (dequantize)."""
    monkeypatch.setattr(ig, "TILED_MAX_ROWS", 512)
    monkeypatch.setattr(ig, "GEMV_IMPL", "v4")
    assert _runner(monkeypatch, weight(100, 256, 64, seed=5))(40) == ["tiled_gemm"]
    assert _runner(monkeypatch, weight(100, 256, 32, seed=5))(40) == ["tiled_gemm"]
    assert _runner(monkeypatch, weight(64, 576, 576, seed=5))(40) == ["dequant"]
    assert not tg.supported(64, 576, 576) and not tg.supported(64, 512, 48)


def test_stream_layout_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream layout: 33..TILED_MAX rows run tiled_gemm_stream (skinny keeps 17..32),
    off by default; groups of 64 too."""
    monkeypatch.setattr(ig, "GEMV_IMPL", "v4")
    monkeypatch.setattr(ig, "SKINNY_MIN_ROWS", 17)
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 32)
    run = _runner(monkeypatch, weight(4096, 1024, 64, seed=6).as_stream())
    monkeypatch.setattr(ig, "TILED_MAX_ROWS", 0)
    assert run(64) == ["dequant"]
    monkeypatch.setattr(ig, "TILED_MAX_ROWS", 512)
    assert run(32) == ["v4_skinny_t2_w4_n4"]
    assert run(33) == ["tiled_gemm_stream", "tiled_reduce"]  # 16 blocks x 2 splits of 4
    assert tg.choose_splits(4096, 1024, 33) == (2, 4)
    assert run(512) == ["tiled_gemm_stream"]  # 8 x 16 blocks: no split
    assert run(513) == ["dequant"]


def test_tiles_layout_keeps_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ig, "TILED_MAX_ROWS", 512)
    monkeypatch.setattr(ig, "GEMV_IMPL", "v4")
    monkeypatch.setattr(tg, "gemm", lambda *a, **k: pytest.fail("tiled on a tiles weight"))
    assert _runner(monkeypatch, weight(64, 512, 128, seed=6).as_tiles())(64) == ["dequant"]
    assert not tg.supported(64, 512, 128, "tiles") and not tg.supported(40, 512, 128, "stream")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "n", "k", "group_size", "splits"),
    [
        (33, 48, 256, 128, None),  # 3 tiles of 16 (warp 1 has one; 13 tiles past N)
        (70, 304, 384, 64, 3),  # 2 row blocks; 2 channel blocks (the second: 3 tiles); groups of 64
        (100, 32, 512, 512, 2),  # one group
    ],
)
def test_emulated_stream_equals_reference(
    dtype: torch.dtype, m: int, n: int, k: int, group_size: int, splits: int | None
) -> None:
    w = weight(n, k, group_size, seed=m + n, zmax=16).as_stream()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    got = em.emulate(x, w, splits)
    assert not np.isnan(got).any(), "an output element was not written (or NaN x was read)"
    ref = _rounded_ref(x, w)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_stream_emulation_catches_a_wrong_swizzle(monkeypatch: pytest.MonkeyPatch) -> None:
    w = weight(32, 256, 128, seed=2).as_stream()
    x = torch.randn(16, 256).to(torch.bfloat16)
    ref = _rounded_ref(x, w)
    monkeypatch.setattr(em, "sslot", lambda row, ch: row * 16 + ch)  # the reader keeps it
    got = em.emulate(x, w)
    assert np.isnan(got).any() or not np.allclose(got, ref, rtol=1e-3)


def test_env_switch() -> None:
    def read(**extra: str) -> str:
        return read_switches(("TILED_MAX_ROWS", "TILED_MIN_ROWS"), "HEADRACE_INT4_", **extra)

    assert read() == "64 33"  # one 64-row pass: where the H200 measured it ahead
    assert read(HEADRACE_INT4_TILED_MAX="512") == "512 33"
    assert read(HEADRACE_INT4_TILED_MAX="0") == "0 33"


def test_kernel_names_in_source() -> None:
    text = tg.source()
    for name in tg.KERNELS:
        assert re.search(rf'extern "C" __global__ void __launch_bounds__\([^)]*\) {name}\(', text)
