"""Every CUDA kernel compiles with NVRTC for sm_90, for each instantiation (no GPU needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cuda import compiler


def test_nvrtc_available() -> None:
    # The test extra installs NVRTC and cuda.core: a missing piece is a failure, not a skip.
    assert compiler.nvrtc_available() is None


def test_nvrtc_is_the_gpu_images_release() -> None:
    # The GPU image compiles with CUDA 13.0's NVRTC, which segfaulted on a kernel that 13.5
    # compiled: checking with a newer NVRTC here would pass what the GPU machine cannot build.
    from cuda.bindings import nvrtc

    _err, major, minor = nvrtc.nvrtcVersion()
    assert (major, minor) == (13, 0), f"NVRTC {major}.{minor}; the GPU image has 13.0"


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


@pytest.mark.parametrize("kv_fp8", [False, True], ids=["kv16", "kvfp8"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_prefill_v2_compiles(dtype_name: str, head_dim: int, kv_fp8: bool) -> None:
    """The prefill kernel (round 2, cuda/prefill_attention_v2.cu), every configuration and KV
    type: no spills and no stack frame anywhere."""
    import torch

    from cuda import prefill_v2

    cubin, log = compiler.compile_cubin(
        prefill_v2.source(),
        arch="sm_90",
        defines=prefill_v2.module_defines(getattr(torch, dtype_name), head_dim, kv_fp8),
        name="prefill_attention_v2",
        verbose_ptxas=True,
    )
    parts = re.split(r"Compiling entry function '(\w+)'", log)[1:]
    reports = dict(zip(parts[::2], parts[1::2], strict=True))
    assert sorted(reports) == sorted(c.kernel_name for c in prefill_v2.CONFIGS)
    for name in reports:
        assert name.encode() in cubin
    _check_log(log)


def _decode_log(
    dtype_name: str, head_dim: int, config: str | None = None, merge3: bool = False
) -> str:
    import torch

    from cuda import decode_attention as da

    cfg = da.parse_config(config) if config else None
    cubin, log = compiler.compile_cubin(
        da.source(),
        arch="sm_90",
        defines=da.module_defines(getattr(torch, dtype_name), head_dim, cfg, merge3),
        name="decode_attention",
        verbose_ptxas=True,
    )
    for name in ("decode_tc", "decode_tc_fp8", "decode_tc_fp8h", "decode_tc_merge"):
        assert f"Compiling entry function '{name}'" in log
        assert name.encode() in cubin
    _check_log(log)
    return log


def _decode_entries(log: str) -> dict[str, tuple[int, int]]:
    """(registers, static shared bytes) per entry function."""
    out = {}
    for entry in log.split("Compiling entry function '")[1:]:
        smem = re.search(r"(\d+) bytes smem", entry)
        regs = re.search(r"Used (\d+) registers", entry)
        assert regs, entry
        out[entry.split("'")[0]] = (int(regs.group(1)), int(smem.group(1)) if smem else 0)
    return out


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_decode_attention_compiles(dtype_name: str, head_dim: int) -> None:
    """The tensor-core decode kernel: both KV types (one template) and the merge, no spills,
    no static shared memory but the fused merge's flag (the stages are dynamic:
    cuda/decode_attention.py sizes them),
    and registers for 3 blocks of 4 warps per SM."""
    from cuda import decode_attention as da

    entries = _decode_entries(_decode_log(dtype_name, head_dim))
    assert set(entries) == {"decode_tc", "decode_tc_fp8", "decode_tc_fp8h", "decode_tc_merge"}
    assert all(smem <= 16 for _, smem in entries.values()), entries  # the merge flag
    assert max(regs for regs, _ in entries.values()) <= 168, entries  # 12 warps per SM
    for kv_bytes, cfg in da.DEFAULT_CONFIGS.items():
        assert cfg.smem_bytes(head_dim, kv_bytes) <= 64 * 1024  # 3 blocks fit 227 KB
        assert cfg.smem_bytes(head_dim, kv_bytes) >= cfg.warps * 8 * (head_dim + 2) * 4


@pytest.mark.parametrize("config", ["w2s3", "w3s3", "w4s3", "w4s4"])
def test_decode_attention_variants_compile(config: str) -> None:
    """The variants the benchmark compares (the default's test is above), bf16 head_dim 128."""
    from cuda import decode_attention as da

    assert config in da.CONFIGS
    entries = _decode_entries(_decode_log("bfloat16", 128, config))
    cfg = da.parse_config(config)
    per_sm = 65536 // (max(regs for regs, _ in entries.values()) * cfg.threads)
    assert per_sm * cfg.warps >= 8, entries  # at least round 1's 8 warps per SM


@pytest.mark.parametrize(
    ("dtype_name", "head_dim", "config"),
    [("bfloat16", 128, "w2s3"), ("bfloat16", 128, "w4s4"), ("float16", 64, "w4s3")],
)
def test_decode_attention_merge3_compiles(dtype_name: str, head_dim: int, config: str) -> None:
    """HEADRACE_DECODE_PLAN=v3's modules (its fused merge, HR_DECODE_MERGE3): no spills,
    no stack, static shared memory only the merge flag, registers as the v2 modules'."""
    entries = _decode_entries(_decode_log(dtype_name, head_dim, config, merge3=True))
    assert all(smem <= 16 for _, smem in entries.values()), entries
    assert max(regs for regs, _ in entries.values()) <= 168, entries


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


@pytest.mark.slow  # ~35 s a dtype on a small CPU: 14 instantiations in 4 modules
@pytest.mark.parametrize("m_t", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_int4_split_gemv_compiles(dtype_name: str, m_t: int) -> None:
    import torch

    from cuda import int4_gemv

    cubin, log = compiler.compile_cubin(
        int4_gemv.source(),
        arch="sm_90",
        defines=int4_gemv.module_defines(getattr(torch, dtype_name), m_t),
        name="int4_gemv",
        verbose_ptxas=True,
    )
    for name in int4_gemv.kernel_names(m_t):
        assert f"Compiling entry function '{name}'" in log
        assert name.encode() in cubin
    assert len(re.findall(r"bytes spill stores", log)) == len(int4_gemv.kernel_names(m_t)), log
    _check_log(log)
    # Batch 1 (W1) kernels keep two 256-thread blocks per SM resident: <= 128 registers.
    regs = dict(re.findall(r"entry function '(\w+)'.*?Used (\d+) registers", log, re.S))
    assert set(regs) == set(int4_gemv.kernel_names(m_t))
    assert all(int(n) <= 128 for name, n in regs.items() if name.startswith("gemv_sk_m1_")), regs
    # Static shared memory fits the 1 KB that int4_gemv.SMEM_MAX leaves under 48 KB.
    static = [int(n) for n in re.findall(r"(\d+) bytes smem", log)]
    assert static and max(static) + int4_gemv.SMEM_MAX <= 48 * 1024, static


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_int4_v4_gemv_compiles_for_sm90(dtype_name: str) -> None:
    import torch

    from cuda import int4_v4_gemv as v4

    cubin, log = compiler.compile_cubin(
        v4.source(),
        arch="sm_90",
        defines=v4.module_defines(getattr(torch, dtype_name)),
        name="int4_v4_gemv",
        verbose_ptxas=True,
        use_cache=False,
    )
    for name in v4.kernel_names():
        assert f"Compiling entry function '{name}'" in log and name.encode() in cubin
    _check_log(log)
    assert "0 bytes spill stores" in log and not re.search(r"[1-9]\d* bytes spill", log), log
    assert not re.search(r"[1-9]\d* bytes stack frame", log), log
    regs = dict(re.findall(r"entry function '(\w+)'.*?Used (\d+) registers", log, re.S))
    assert set(regs) == set(v4.kernel_names()) | set(v4.skinny_kernel_names())
    regs = {name: regs[name] for name in v4.kernel_names()}  # skinny: test_int4_mma_skinny_...
    assert all(int(r) <= 64 for r in regs.values()), regs  # 32 warps an SM


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["rows", "stream"])
def test_int4_mma_skinny_compiles_for_sm90(dtype_name: str, layout: str) -> None:
    """The skinny W4A16 GEMM (issue 14: cuda/int4_mma_gemv.cu's mma_skinny_* on the rows
    layout, cuda/int4_v4_gemv.cu's v4_skinny_* on the stream layout): every variant
    spill-free with no stack frame; NT = 4 within 128 registers (2 blocks an SM)."""
    import torch

    from cuda import int4_mma_gemv as mg
    from cuda import int4_v4_gemv as v4

    mod = mg if layout == "rows" else v4
    cubin, log = compiler.compile_cubin(
        mod.source(),
        arch="sm_90",
        defines=mod.module_defines(getattr(torch, dtype_name)),
        name="int4_mma_gemv" if layout == "rows" else "int4_v4_gemv",
        verbose_ptxas=True,
        use_cache=False,
    )
    parts = re.split(r"Compiling entry function '(\w+)'", log)[1:]
    entries = dict(zip(parts[::2], parts[1::2], strict=True))
    for name in mod.skinny_kernel_names():
        assert name in entries and name.encode() in cubin, name
        body = entries[name]
        assert re.search(r"\b0 bytes spill stores", body) and not re.search(
            r"[1-9]\d* bytes spill", body
        ), body
        assert not re.search(r"[1-9]\d* bytes stack frame", body), body
        regs = int(re.search(r"Used (\d+) registers", body).group(1))  # type: ignore[union-attr]
        assert regs <= (128 if name.endswith("_n4") else 255), (name, regs)
    _check_log(log)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_int4_tiled_gemm_compiles_for_sm90(dtype_name: str) -> None:
    """The tiled W4A16 GEMM (issue 14, cuda/int4_tiled_gemm.cu): both kernels spill-free
    with no stack frame; tiled_gemm within 255 registers (one 256-thread block an SM, which
    its ~192 KB of shared memory allows anyway)."""
    import torch

    from cuda import int4_tiled_gemm as tg

    cubin, log = compiler.compile_cubin(
        tg.source(),
        arch="sm_90",
        defines=tg.module_defines(getattr(torch, dtype_name)),
        name="int4_tiled_gemm",
        verbose_ptxas=True,
        use_cache=False,
    )
    parts = re.split(r"Compiling entry function '(\w+)'", log)[1:]
    entries = dict(zip(parts[::2], parts[1::2], strict=True))
    assert set(entries) == set(tg.KERNELS)
    for name, body in entries.items():
        assert name.encode() in cubin, name
        assert re.search(r"\b0 bytes spill stores", body) and not re.search(
            r"[1-9]\d* bytes spill", body
        ), body
        assert not re.search(r"[1-9]\d* bytes stack frame", body), body
        regs = int(re.search(r"Used (\d+) registers", body).group(1))  # type: ignore[union-attr]
        assert regs * tg.THREADS <= 65536, (name, regs)
    _check_log(log)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_norm_quant_compiles(dtype_name: str) -> None:
    """The add + RMSNorm + FP8 quantization kernel (cuda/norm_quant.cu): no spills, no stack
    frame, and registers that let its largest block (1024 threads, H = 8192) launch."""
    import torch

    from cuda import norm_quant

    cubin, log = compiler.compile_cubin(
        norm_quant.source(),
        arch="sm_90",
        defines=norm_quant.module_defines(getattr(torch, dtype_name)),
        name="norm_quant",
        verbose_ptxas=True,
    )
    assert f"Compiling entry function '{norm_quant.KERNEL}'" in log
    assert norm_quant.KERNEL.encode() in cubin
    _check_log(log)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))  # type: ignore[union-attr]
    assert regs * 1024 <= 65536, regs


def test_norm_quant_shares_the_norm_passes() -> None:
    """fused_ops and norm_quant paste the same rms_norm.cuh (the bit-identical normed rows
    rest on it)."""
    from cuda import fused_ops, norm_quant

    header = (Path(compiler.__file__).parent / "rms_norm.cuh").read_text()
    body = header.split("#pragma once", 1)[1].split('#include "elem_type.cuh"', 1)[1]
    assert body in fused_ops.source() and body in norm_quant.source()
    assert '#include "' not in norm_quant.source()
