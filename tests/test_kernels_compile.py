"""Every CUDA kernel compiles with NVRTC for sm_90, for each instantiation (no GPU needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cuda import compiler


def test_nvrtc_available() -> None:
    # The test extra installs NVRTC and cuda.core: a missing piece is a failure, not a skip.
    assert compiler.nvrtc_available() is None


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cache hit would skip the compile this test exists to run.
    monkeypatch.setattr(compiler, "CACHE_DIR", tmp_path)


def _check_log(log: str) -> None:
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and not any(spills), f"register spills:\n{log}"
    stack = [int(n) for n in re.findall(r"(\d+) bytes stack frame", log)]
    assert not any(stack), f"local-memory stack frame:\n{log}"


@pytest.mark.parametrize("kv_fp8", [False, True], ids=["kv16", "kvfp8"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_paged_attention_compiles(dtype_name: str, head_dim: int, kv_fp8: bool) -> None:
    import torch

    from cuda import paged_attention_kernels as pak

    dtype = getattr(torch, dtype_name)
    kv_dtype = torch.float8_e4m3fn if kv_fp8 else None
    cubin, log = compiler.compile_cubin(
        pak.source(),
        arch="sm_90",
        defines=pak.module_defines(dtype, head_dim, kv_dtype),
        name="paged_attention",
        verbose_ptxas=True,
    )
    for name in ("decode_g1", "decode_g2", "decode_g4", "decode_g8", "merge_splits", "prefill"):
        assert f"Compiling entry function '{name}'" in log
        assert name.encode() in cubin
    _check_log(log)


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("module_name", ["fused_ops", "layer_ops"])
def test_elementwise_modules_compile(module_name: str, dtype_name: str) -> None:
    import importlib

    import torch

    module = importlib.import_module(f"cuda.{module_name}")
    cubin, log = compiler.compile_cubin(
        module.source(),
        arch="sm_90",
        defines=module.module_defines(getattr(torch, dtype_name)),
        name=module_name,
        verbose_ptxas=True,
    )
    for name in module.KERNELS:
        assert f"Compiling entry function '{name}'" in log
        assert name.encode() in cubin
    assert len(re.findall(r"bytes spill stores", log)) == len(module.KERNELS), log
    _check_log(log)


def test_write_kv_compiles() -> None:
    from cuda import kv_write_kernel

    _, log = compiler.compile_cubin(
        kv_write_kernel.SOURCE, arch="sm_90", name="write_kv", verbose_ptxas=True
    )
    for name in ("write_kv", "write_kv_fp8_bf16", "write_kv_fp8_f16"):
        assert f"Compiling entry function '{name}'" in log
    _check_log(log)


@pytest.mark.parametrize("bf16", [1, 0])
def test_fp8_quant_compiles(bf16: int) -> None:
    from cuda import fp8_quant

    cubin, log = compiler.compile_cubin(
        fp8_quant.SOURCE,
        arch="sm_90",
        defines={"HR_BF16": bf16},
        name="fp8_quant",
        verbose_ptxas=True,
    )
    assert b"quant_fp8_per_token" in cubin
    _check_log(log)


def test_cache_hit_returns_same_cubin() -> None:
    from cuda import kv_write_kernel

    first, _ = compiler.compile_cubin(kv_write_kernel.SOURCE, arch="sm_90", name="write_kv")
    second, log2 = compiler.compile_cubin(kv_write_kernel.SOURCE, arch="sm_90", name="write_kv")
    assert first == second and log2 == ""
    key_a = compiler.cache_key("x", "sm_90", {"A": 1})
    assert key_a != compiler.cache_key("x", "sm_90", {"A": 2})
    assert key_a != compiler.cache_key("x", "sm_80", {"A": 1})


def test_compile_error_carries_log() -> None:
    with pytest.raises(compiler.KernelCompileError, match="undefined"):
        compiler.compile_cubin(
            'extern "C" __global__ void k() { undefined_symbol(); }', name="bad", use_cache=False
        )


@pytest.mark.parametrize("mode", ["new", "old"])
@pytest.mark.parametrize("bf16", [1, 0])
def test_fp8_gemv_compiles(bf16: int, mode: str) -> None:
    from cuda import fp8_gemv

    _, log = compiler.compile_cubin(
        fp8_gemv.source(mode),
        arch="sm_90",
        defines={"HR_BF16": bf16},
        name=f"fp8_gemv_{mode}",
        verbose_ptxas=True,
    )
    for m in range(1, fp8_gemv.MAX_ROWS[mode] + 1):
        assert f"Compiling entry function '{fp8_gemv.plan(m, 64, mode).kernel}'" in log
    _check_log(log)


def test_read_source_pastes_local_headers(tmp_path: Path) -> None:
    (tmp_path / "a.cuh").write_text('#pragma once\n#include "b.cuh"\nint a;\n')
    (tmp_path / "b.cuh").write_text("int b;\n")
    (tmp_path / "k.cu").write_text(
        '#include <cuda_fp16.h>\n#include "a.cuh"  // a\n#include "b.cuh"\nint k;\n'
    )
    text = compiler.read_source(tmp_path / "k.cu")
    # System headers stay for NVRTC; ours are pasted once each, in include order.
    assert text == "#include <cuda_fp16.h>\n#pragma once\nint b;\n\nint a;\n\n\nint k;\n"


def test_shared_header_is_in_every_including_source() -> None:
    from cuda import fused_ops, layer_ops

    header = (Path(compiler.__file__).parent / "elem_type.cuh").read_text()
    for module in (fused_ops, layer_ops):
        assert header in module.source() and '#include "' not in module.source()
