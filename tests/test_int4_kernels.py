"""The W4A16 kernels' layout and reference (CPU), and their NVRTC compile for sm_90."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cuda import compiler
from cuda import int4_gemm as ig


def random_weight(n: int, k: int, group_size: int, seed: int = 0) -> ig.Int4Weight:
    g = torch.Generator().manual_seed(seed)
    groups = k // group_size
    return ig.Int4Weight(
        qw=ig.pack_rows(torch.randint(0, 16, (n, k), generator=g)),
        scales=(torch.rand(n, groups, generator=g) * 0.02 + 0.001).half(),
        zeros=torch.randint(0, 16, (n, groups), generator=g).to(torch.uint8),
        group_size=group_size,
    )


def test_pack_rows_is_nibble_j_of_word_w_for_column_8w_plus_j() -> None:
    values = torch.arange(16).repeat(2)[None, :]  # columns 0..31 hold 0..15, 0..15
    qw = ig.pack_rows(values)
    assert qw.shape == (1, 4)
    assert (int(qw[0, 0]) & 0xFFFFFFFF) == 0x76543210
    assert (int(qw[0, 1]) & 0xFFFFFFFF) == 0xFEDCBA98
    assert torch.equal(ig.unpack_rows(qw), values)


@pytest.mark.parametrize("group_size", [32, 128, 256])
def test_reference_is_the_dequantized_matmul(group_size: int) -> None:
    w = random_weight(24, 256, group_size)
    q = ig.unpack_rows(w.qw).float()
    g = torch.arange(256) // group_size
    expected_w = (q - w.zeros.float()[:, g]) * w.scales.float()[:, g]
    x = torch.randn(5, 256)
    torch.testing.assert_close(ig.int4_linear(x, w), x @ expected_w.t())
    perm = torch.randperm(256)
    wp = ig.Int4Weight(w.qw, w.scales, w.zeros, group_size, perm)
    torch.testing.assert_close(ig.int4_linear(x, wp), x[:, perm] @ expected_w.t())


def test_gemv_launch_grid_and_args() -> None:
    w = random_weight(100, 256, 128)
    x = torch.zeros(3, 256, dtype=torch.bfloat16)
    name, grid, args = ig.gemv_launch(x[:2], w, torch.empty(2, 100, dtype=torch.bfloat16))
    assert name == "gemv_m2" and grid == (7,)  # 100 channels / 16 per block
    assert args[7] == 100 and args[8] == 256 and args[9] == 128


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_int4_kernels_compile(
    dtype_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiler, "CACHE_DIR", tmp_path)  # a cache hit would skip the compile
    cubin, log = compiler.compile_cubin(
        ig.source(),
        arch="sm_90",
        defines=ig.module_defines(getattr(torch, dtype_name)),
        name="int4_gemm",
        verbose_ptxas=True,
    )
    for name in ig.KERNELS:
        assert f"Compiling entry function '{name}'" in log
        assert name.encode() in cubin
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and not any(spills), log
