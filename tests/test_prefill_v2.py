"""Prefill round 2 (cuda/prefill_v2.py, cuda/prefill_attention_v2.cu), the prefill kernel, on
CPU: configurations against the source, shared-memory layout, launch grid and arguments (FP8
scales folded), the routing of `attention_cuda`, and (tests/test_prefill_v2_emulation.py)
emulations of its inner loop: the SUB-key softmax steps with the lazy rescale and the
warp-level causal skip, Q fragments in registers at 32 rows per warp, the sub-step ldmatrix
offsets, and the FP8 tiles' raw copy and widening. The GPU half is
tests/gpu/test_gpu_prefill_v2.py.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
import torch

from cuda import compiler
from cuda import paged_attention_kernels as pak
from cuda import prefill_attention as pa
from cuda import prefill_v2 as v2
from cuda.paged_attention import AttentionParams
from tests.kernel_signatures import kernel_parameters
from tests.test_prefill_attention import _case

RESCALE_LOG2 = 8.0  # pf2::RESCALE_LOG2 (tests/test_prefill_v2_emulation.py uses it)


def test_configs_match_the_source_and_fit_shared_memory() -> None:
    src = v2.source()
    entries = re.findall(r"void __launch_bounds__\((\d+), (\d+)\) prefill2_(\w+)\(", src)
    assert [f"v2_{name}" for _, _, name in entries] == [c.name for c in v2.CONFIGS]
    assert f"constexpr float RESCALE_LOG2 = {RESCALE_LOG2:.0f}.f;" in src
    for (threads, min_blocks, name), c in zip(entries, v2.CONFIGS, strict=True):
        assert int(threads) == c.threads and int(min_blocks) == c.min_blocks()
        pipe = "true" if c.pipe else "false"
        impl = f"pf2::prefill_v2_impl<{c.block_m}, {c.block_n}, {c.warps}, {c.stages}, {c.sub}, {pipe}>"
        assert f"prefill2_{name}(HR_PREFILL2_ARGS) {{\n    {impl}(HR_PREFILL2_PASS);" in src
        assert c.kernel_name == f"prefill2_{name}"
        for d in pa.HEAD_DIMS:
            for fp8 in (False, True):
                smem = c.smem_bytes(d, fp8)
                assert smem <= pa.SMEM_LIMIT
                assert c.min_blocks() * (smem + 1024) <= 228 * 1024, (name, d, fp8)
        assert c.block_m % (16 * c.warps) == 0 and c.block_n % c.sub == 0 and c.sub % 16 == 0
    assert v2.DEFAULT_CONFIG in v2.CONFIGS


def test_smem_bytes_follow_the_tile_layout() -> None:
    # [1024 pad][Q BM x D][K, V rings: STAGES x BN x D as stored][FP8: K16, V16][pages][limits]
    c = v2.BY_NAME["v2_m128n64w4s2k32p"]
    assert c.smem_bytes(128) == 1024 + 128 * 256 + 4 * 64 * 256 + 512 + 512 == 100352
    assert v2.DEFAULT_CONFIG.smem_bytes(64) == 1024 + 128 * 128 + 4 * 64 * 128 + 512 + 512
    assert v2.BY_NAME["v2_m128n128w8s2k64"].smem_bytes(128) == 1024 + (128 + 4 * 128) * 256 + 1536
    assert c.smem_bytes(128, fp8=True) == 1024 + 128 * 256 + 4 * 64 * 128 + 2 * 64 * 256 + 1024


def test_launch_grid_orders_rows_and_bounds_the_grid() -> None:
    # (KV heads, requests, row tiles of the longest request): BM = 128 in every configuration
    for c in v2.CONFIGS:
        assert v2.launch_grid(c, 16384, 4, 8, 1) == (8, 1, 512)
        assert v2.launch_grid(c, 7, 4, 2, 3) == (2, 3, 1)
        assert v2.launch_grid(c, 33, 4, 2, 3) == (2, 3, 2)  # 132 rows: a full and a partial tile
    with pytest.raises(ValueError, match="row tiles"):
        v2.launch_grid(v2.DEFAULT_CONFIG, 3_000_000, 8, 8, 1)


@pytest.mark.parametrize("window", [None, 48], ids=["full", "window48"])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["kv16", "fp8"])
@pytest.mark.parametrize("config", v2.CONFIGS, ids=lambda c: c.name)
def test_launch_arguments_follow_the_kernel_signature(
    monkeypatch: pytest.MonkeyPatch, config: v2.V2Config, kv_dtype: torch.dtype, window: int | None
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(v2, "_kernel", lambda dtype, d, fp8, cfg: (cfg.kernel_name, fp8))
    monkeypatch.setattr(compiler, "launch", lambda *call, shmem=0: calls.append((*call, shmem)))
    t = _case([70, 1, 0], [90, 40, 3], kv_dtype)
    params = AttentionParams(0.125, window, k_scale=0.5, v_scale=3.0)
    v2.prefill_v2_cuda(t["q"], t["kc"], t["md"], params, t["out"], config)
    (((kernel, fp8), grid, block, *args, shmem),) = calls
    is_fp8 = kv_dtype == torch.float8_e4m3fn
    assert kernel == config.kernel_name and block == config.threads and fp8 == is_fp8
    assert shmem == config.smem_bytes(64, is_fp8)
    assert tuple(grid) == (2, 3, math.ceil(70 * 4 / config.block_m))
    signature = kernel_parameters(v2.source())[kernel]
    assert [type(a) for a in args] == [k for _, k in signature]
    got = dict(zip([n for n, _ in signature], args, strict=True))
    for name in ("q", "kc", "query_start_loc", "seq_lens", "block_tables", "out"):
        assert got[name] == t[name].data_ptr(), name
    assert (got["q_stride"], got["out_stride"], got["bt_stride"]) == (8 * 64, 8 * 64, 600)
    assert got["v_off"] == 700 * 32 * 2 * 64  # elements, as the kernel's kv_t pointer counts
    assert (got["num_kv_heads"], got["group"], got["block_shift"]) == (2, 4, 5)
    assert got["window"] == (window or 0)
    # FP8: scores are (q . k_cache) * k_scale and O = P (v_cache * v_scale)
    assert got["scale_log2"] == np.float32(0.125 * pa.LOG2E * (0.5 if is_fp8 else 1.0))
    assert got["v_scale"] == np.float32(3.0 if is_fp8 else 1.0)


def test_env_choices() -> None:
    assert pa.choice_from_env({pa.ENV: "v2"}) == "v2" == pa.choice_from_env({})
    assert pa.choice_from_env({pa.ENV: "v2_m128n128w8s2k64"}) == "v2_m128n128w8s2k64"
    with pytest.raises(ValueError, match="v2_m128n64w4s2k32p"):
        pa.choice_from_env({pa.ENV: "v3"})
    assert pa.fp8_choice_from_env({}) == "new"
    assert pa.fp8_choice_from_env({pa.FP8_ENV: "old"}) == "old"
    with pytest.raises(ValueError, match="HEADRACE_PREFILL_FP8"):
        pa.fp8_choice_from_env({pa.FP8_ENV: "v2"})
    assert v2.config_for("v2") == v2.DEFAULT_CONFIG == v2.config_for("new")
    assert v2.config_for("v2_m128n64w8s2k64") == v2.BY_NAME["v2_m128n64w8s2k64"]


FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16


@pytest.mark.parametrize(
    ("q_lens", "kv_dtype", "choice", "fp8_choice", "want"),
    [
        ([70, 3], BF16, "v2", "new", "v2:v2_m128n64w4s2k32"),  # the defaults
        ([70, 3], BF16, "v2", "old", "v2:v2_m128n64w4s2k32"),  # FP8's switch leaves 16 bits alone
        ([70, 3], BF16, "new", "new", "v2:v2_m128n64w4s2k32"),  # `new`: the default's alias
        ([70, 3], BF16, "v2_m128n128w8s2k64", "old", "v2:v2_m128n128w8s2k64"),
        ([70, 3, 0], BF16, "v2", "new", "v2:v2_m128n64w4s2k32"),  # a zero-length entry
        ([70, 3], BF16, "old", "new", "old"),
        ([1, 1], BF16, "v2", "new", "old"),  # decode
        ([70, 3], FP8, "v2", "new", "v2:v2_m128n64w4s2k32"),  # FP8 KV: round 2 by default
        ([70, 3], FP8, "v2_m128n64w8s2k64", "new", "v2:v2_m128n64w8s2k64"),
        ([70, 3], FP8, "v2", "old", "old"),  # HEADRACE_PREFILL_FP8=old
        ([70, 3], FP8, "v2_m128n64w8s2k64", "old", "old"),
        ([1, 1], FP8, "v2", "new", "old"),
        ([70, 3], FP8, "old", "new", "old"),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, list) else str(v).removeprefix("torch."),
)
def test_dispatch(
    monkeypatch: pytest.MonkeyPatch,
    q_lens: list[int],
    kv_dtype: torch.dtype,
    choice: str,
    fp8_choice: str,
    want: str,
) -> None:
    ran: list[str] = []
    monkeypatch.setattr(v2, "prefill_v2_cuda", lambda *a, **k: ran.append(f"v2:{a[5].name}"))
    monkeypatch.setattr(pak, "paged_attention_cuda", lambda *a, **k: ran.append("old"))
    t = _case(q_lens, [90, 40, 0][: len(q_lens)], kv_dtype)
    params = AttentionParams(0.125)
    pa.attention_cuda(t["q"], t["kc"], t["md"], params, t["out"], None, choice, fp8_choice)
    assert ran == [want]


def test_unsupported_reasons() -> None:
    t = _case([5], [9], FP8)
    assert v2.unsupported_reason(t["q"], t["kc"], t["md"]) is None
    assert "differs" in str(pa.unsupported_reason(t["q"], t["kc"], t["md"]))
    half = torch.zeros(2, 10, 32, 2, 64, dtype=torch.float16)
    assert "differs" in str(v2.unsupported_reason(t["q"], half, t["md"]))
    odd = torch.zeros(2, 10, 24, 2, 64, dtype=FP8)
    assert "power of two" in str(v2.unsupported_reason(t["q"], odd, t["md"]))


def test_warm_kernels_compiles_what_round_2_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/warm_kernels.py --only prefill_attention_v2 hits the cache keys _kernel asks
    for, and the default set holds them (round 2 is the prefill kernel)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "warm_kernels.py"
    spec = importlib.util.spec_from_file_location("warm", path)
    assert spec is not None and spec.loader is not None
    warm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(warm)
    asked: list[tuple[str, str, dict[str, Any]]] = []

    class _Mod:
        def kernel(self, name: str) -> str:
            return name

    def load_module(source: str, *, defines: dict | None = None, name: str = "") -> _Mod:
        asked.append((name, source, dict(defines or {})))
        return _Mod()

    monkeypatch.setattr(compiler, "load_module", load_module)
    monkeypatch.setattr(pa, "_allow_smem", lambda *a: None)
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            for fp8 in (False, True):
                v2._kernel(dtype, head_dim, fp8, v2.DEFAULT_CONFIG)
    assert sorted(map(repr, asked)) == sorted(map(repr, warm.select(["prefill_attention_v2"])))
    assert set(map(repr, warm.select(["prefill_attention_v2"]))) <= set(map(repr, warm.jobs()))
