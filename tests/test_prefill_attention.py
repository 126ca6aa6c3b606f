"""The prefill kernel's host side and tile schedule, on CPU (the GPU half is
tests/gpu/test_gpu_prefill_attention.py; fragment addressing: tests/test_prefill_fragments.py).

`block_schedule` transcribes the kernel's per-block index math (cuda/prefill_attention.cu,
prefill_impl's preamble and masking test); the tests check that the tiles it computes cover
exactly the visible (row, key) pairs, that only flagged tiles can hold hidden pairs, and
that an emulation of the kernel's online softmax over that schedule equals the reference.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from cuda import compiler
from cuda import paged_attention_kernels as pak
from cuda import prefill_attention as pa
from cuda.paged_attention import AttentionMetadata, AttentionParams, causal_mask
from tests.kernel_signatures import kernel_parameters


@dataclass
class Block:
    m0: int  # first row (negative: the request's partial first tile)
    m_end: int
    n_begin: int
    n_end: int
    kv_hi: int  # keys >= kv_hi are zero-filled, never read
    masked: list[bool]  # per tile n_begin..n_end-1: does the kernel apply the mask?


def block_schedule(
    z: int, q_len: int, seq_len: int, group: int, bm: int, bn: int, window: int
) -> Block | None:
    rows = q_len * group
    m_end = rows - z * bm
    if m_end <= 0 or seq_len <= 0:
        return None
    m0 = m_end - bm
    ctx = seq_len - q_len
    i_lo = max(m0, 0) // group
    i_hi = (m_end - 1) // group
    kv_hi = min(seq_len, i_hi + ctx + 1)
    n_end = (kv_hi + bn - 1) // bn
    unmasked_below = min(seq_len, i_lo + ctx + 1)
    n_begin = max(0, i_lo + ctx - window + 1) // bn if window > 0 else 0
    masked_below = i_hi + ctx - window + 1 if window > 0 else 0
    masked = [n * bn + bn > unmasked_below or n * bn < masked_below for n in range(n_begin, n_end)]
    return Block(m0, m_end, n_begin, n_end, kv_hi, masked)


def visible(q_len: int, seq_len: int, group: int, window: int) -> np.ndarray:
    """[rows, seq_len] bool from the reference's mask, rows = token x group head."""
    mask = causal_mask(q_len, seq_len, window or None, torch.device("cpu")).numpy()
    return np.repeat(mask, group, axis=0)


def random_shapes(n: int, seed: int) -> list[tuple[int, int, int, int]]:
    rnd = random.Random(seed)
    shapes = [(1, 1, 1, 0), (2, 2, 7, 0), (129, 129, 3, 0), (64, 300, 4, 0), (33, 100, 7, 40)]
    for _ in range(n):
        seq_len = rnd.choice([rnd.randint(1, 40), rnd.randint(1, 700)])
        q_len = rnd.choice([seq_len, rnd.randint(1, seq_len)])
        window = rnd.choice([0, 0, rnd.randint(1, 300)])
        shapes.append((q_len, seq_len, rnd.choice([1, 3, 4, 7, 8]), window))
    return shapes


@pytest.mark.parametrize("config", pa.CONFIGS, ids=lambda c: c.name)
def test_tiles_cover_exactly_the_visible_pairs(config: pa.TileConfig) -> None:
    bm, bn = config.block_m, config.block_n
    for q_len, seq_len, group, window in random_shapes(40, bm + bn):
        vis = visible(q_len, seq_len, group, window)
        rows = q_len * group
        covered = np.zeros_like(vis)
        owner = np.zeros(rows, dtype=int)
        for z in range(math.ceil(rows / bm)):
            b = block_schedule(z, q_len, seq_len, group, bm, bn, window)
            assert b is not None and b.n_begin < b.n_end
            r = slice(max(b.m0, 0), b.m_end)
            owner[r] += 1
            assert not vis[r, b.kv_hi :].any(), "a visible key is never loaded"
            for n, masked in zip(range(b.n_begin, b.n_end), b.masked, strict=True):
                keys = slice(n * bn, min((n + 1) * bn, b.kv_hi))
                covered[r, keys] = True
                if not masked:
                    assert vis[r, keys].all(), ("unmasked tile hides keys", n, q_len, seq_len)
        assert (owner == 1).all(), "row tiles must partition the rows"
        assert not (vis & ~covered).any(), ("visible pairs outside the tiles", q_len, seq_len)
        assert block_schedule(math.ceil(rows / bm), q_len, seq_len, group, bm, bn, window) is None


def emulate_block(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    b: Block,
    q_len: int,
    seq_len: int,
    group: int,
    bn: int,
    window: int,
    scale_log2: float,
) -> np.ndarray:
    """The kernel's loop for one block in float64: rows m0..m_end-1 of q ([rows, D]); keys
    past kv_hi zero-filled; mask only on flagged tiles; exp2 with the -inf guard."""
    bm = b.m_end - b.m0
    d = q.shape[1]
    qt = np.zeros((bm, d))
    lo = max(b.m0, 0)
    qt[lo - b.m0 :] = q[lo : b.m_end]
    limit = np.array([m // group + seq_len - q_len if m >= 0 else -1 for m in range(b.m0, b.m_end)])
    m_run = np.full(bm, -np.inf)
    l_run = np.zeros(bm)
    o = np.zeros((bm, d))
    for n, masked in zip(range(b.n_begin, b.n_end), b.masked, strict=True):
        j = np.arange(n * bn, n * bn + bn)
        kt = np.where((j < b.kv_hi)[:, None], k[np.minimum(j, seq_len - 1)], 0.0)
        vt = np.where((j < b.kv_hi)[:, None], v[np.minimum(j, seq_len - 1)], 0.0)
        s = qt @ kt.T
        if masked:
            lower = limit - window if window > 0 else np.full(bm, -1)
            s[(j[None, :] > limit[:, None]) | (j[None, :] <= lower[:, None])] = -np.inf
        m_new = np.maximum(m_run, s.max(1) * scale_log2)
        base = np.where(m_new == -np.inf, 0.0, m_new)
        corr = np.exp2(m_run - base)
        p = np.exp2(s * scale_log2 - base[:, None])
        l_run = l_run * corr + p.sum(1)
        o = o * corr[:, None] + p @ vt
        m_run = m_new
    inv = np.where(l_run > 0, 1 / np.where(l_run > 0, l_run, 1), 0.0)
    return (o * inv[:, None])[lo - b.m0 :]


@pytest.mark.parametrize("config", [pa.CONFIGS[0], pa.CONFIGS[3]], ids=lambda c: c.name)
def test_emulated_online_softmax_equals_the_reference(config: pa.TileConfig) -> None:
    rng = np.random.default_rng(config.block_m)
    bm, bn, d = config.block_m, config.block_n, 16
    for q_len, seq_len, group, window in random_shapes(12, 7):
        q = rng.standard_normal((q_len * group, d))
        k, v = rng.standard_normal((seq_len, d)), rng.standard_normal((seq_len, d))
        scale = d**-0.5
        s = (q @ k.T) * scale
        s[~visible(q_len, seq_len, group, window)] = -np.inf
        p = np.exp(s - s.max(1, keepdims=True))
        want = (p / p.sum(1, keepdims=True)) @ v
        got = np.zeros_like(want)
        for z in range(math.ceil(q_len * group / bm)):
            b = block_schedule(z, q_len, seq_len, group, bm, bn, window)
            assert b is not None
            got[max(b.m0, 0) : b.m_end] = emulate_block(
                q, k, v, b, q_len, seq_len, group, bn, window, scale * pa.LOG2E
            )
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_configs_match_the_source_and_fit_shared_memory() -> None:
    src = pa.source()
    entries = re.findall(r"void __launch_bounds__\((\d+), (\d+)\) prefill_(\w+)\(", src)
    assert [name for _, _, name in entries] == [c.name for c in pa.CONFIGS]
    for (threads, min_blocks, name), config in zip(entries, pa.CONFIGS, strict=True):
        assert int(threads) == config.threads
        impl = (
            f"pf::prefill_impl<{config.block_m}, {config.block_n}, {config.warps}, {config.stages}>"
        )
        assert f"prefill_{name}(HR_PREFILL_ARGS) {{\n    {impl}(HR_PREFILL_PASS);" in src
        for d in pa.HEAD_DIMS:
            smem = config.smem_bytes(d)
            assert smem <= pa.SMEM_LIMIT
            # the blocks per SM the launch bounds promise fit in the SM's 228 KiB
            assert int(min_blocks) * (smem + 1024) <= 228 * 1024, (name, d)
    # 16 rows per mma tile, whole tiles per warp, copies split evenly over the threads
    for c in pa.CONFIGS:
        assert c.block_m % (16 * c.warps) == 0 and c.block_n % 16 == 0 and c.stages >= 2
    assert all(c.name in pa.BY_NAME for c in pa.DEFAULT_CONFIG.values())


def test_smem_bytes_follow_the_tile_layout() -> None:
    # [1024 pad][Q BM x D][K, V: STAGES x BN x D each][pages 2 x BN int][limits BM int]
    c = pa.BY_NAME["m128n64w4s2"]
    assert c.smem_bytes(128) == 1024 + 128 * 256 + 4 * 64 * 256 + 512 + 512 == 100352
    assert pa.BY_NAME["m128n64w8s3"].smem_bytes(128) == 1024 + (128 + 6 * 64) * 256 + 1024


def test_launch_grid_orders_rows_and_bounds_the_grid() -> None:
    c = pa.BY_NAME["m128n64w4s2"]
    assert pa.launch_grid(c, 16384, 4, 8, 1) == (8, 1, 512)
    assert pa.launch_grid(c, 7, 4, 2, 3) == (2, 3, 1)
    assert pa.launch_grid(c, 33, 4, 2, 3) == (2, 3, 2)  # 132 rows: a full and a partial tile
    with pytest.raises(ValueError, match="row tiles"):
        pa.launch_grid(c, 3_000_000, 8, 8, 1)


def test_env_choice() -> None:
    assert pa.choice_from_env({}) == "v2"  # round 2, cuda/prefill_v2.py (tests/test_prefill_v2.py)
    assert pa.choice_from_env({pa.ENV: "new"}) == "new"
    assert pa.choice_from_env({pa.ENV: "old"}) == "old"
    assert pa.choice_from_env({pa.ENV: "m128n64w8s2"}) == "m128n64w8s2"
    with pytest.raises(ValueError, match="HEADRACE_PREFILL_KERNEL"):
        pa.choice_from_env({pa.ENV: "fast"})
    assert pa.config_for("old", 128) is None
    assert pa.config_for("new", 64) == pa.DEFAULT_CONFIG[64]
    assert pa.config_for("m64n64w4s2", 128) == pa.BY_NAME["m64n64w4s2"]


class _OnDevice(torch.Tensor):
    """A CPU tensor the wrappers take for a CUDA one (is_cuda is all they ask)."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def _case(
    q_lens: list[int], seq_lens: list[int], kv_dtype: torch.dtype = torch.bfloat16
) -> dict[str, Any]:
    t: dict[str, Any] = {
        "q": torch.randn(sum(q_lens), 8, 64, dtype=torch.bfloat16).as_subclass(_OnDevice),
        "kc": torch.zeros(2, 700, 32, 2, 64, dtype=kv_dtype),
        "query_start_loc": torch.tensor([0, *np.cumsum(q_lens)], dtype=torch.int32),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "block_tables": torch.zeros(len(q_lens), 600, dtype=torch.int32),
    }
    t["out"] = torch.empty_like(t["q"])
    t["md"] = AttentionMetadata(
        t["query_start_loc"],
        t["seq_lens"],
        t["block_tables"],
        torch.empty(0, dtype=torch.int64),
        max(q_lens),
        max(seq_lens),
    )
    return t


@pytest.mark.parametrize("window", [None, 48])
@pytest.mark.parametrize("config", pa.CONFIGS, ids=lambda c: c.name)
def test_launch_arguments_follow_the_kernel_signature(
    monkeypatch: pytest.MonkeyPatch, config: pa.TileConfig, window: int | None
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(pa, "_kernel", lambda dtype, head_dim, cfg: cfg.kernel_name)
    monkeypatch.setattr(compiler, "launch", lambda *call, shmem=0: calls.append((*call, shmem)))
    t = _case([70, 1, 0], [90, 40, 3])
    params = AttentionParams(0.125, window)
    pa.prefill_attention_cuda(t["q"], t["kc"], t["md"], params, t["out"], config)
    ((kernel, grid, block, *args, shmem),) = calls
    assert kernel == config.kernel_name and block == config.threads
    assert shmem == config.smem_bytes(64)
    assert tuple(grid) == (2, 3, math.ceil(70 * 4 / config.block_m))
    signature = kernel_parameters(pa.source())[kernel]
    assert [type(a) for a in args] == [k for _, k in signature]
    got = dict(zip([n for n, _ in signature], args, strict=True))
    for name in ("q", "kc", "query_start_loc", "seq_lens", "block_tables", "out"):
        assert got[name] == t[name].data_ptr(), name
    assert (got["q_stride"], got["out_stride"], got["bt_stride"]) == (8 * 64, 8 * 64, 600)
    assert got["v_off"] == 700 * 32 * 2 * 64
    assert (got["num_kv_heads"], got["group"], got["block_shift"]) == (2, 4, 5)
    assert got["scale_log2"] == np.float32(0.125 * pa.LOG2E)
    assert got["window"] == (window or 0)


@pytest.mark.parametrize(
    ("q_lens", "kv_dtype", "choice", "want"),
    [
        ([70, 3], torch.bfloat16, "new", "new"),
        ([70, 3], torch.bfloat16, "m64n64w4s2", "new"),
        ([70, 3], torch.bfloat16, "old", "old"),
        ([1, 1], torch.bfloat16, "new", "old"),  # decode
        ([70, 3], torch.float8_e4m3fn, "new", "old"),  # FP8 KV, fp8_choice old: the old kernel
    ],
)
def test_dispatch(
    monkeypatch: pytest.MonkeyPatch,
    q_lens: list[int],
    kv_dtype: torch.dtype,
    choice: str,
    want: str,
) -> None:
    ran: list[str] = []
    monkeypatch.setattr(pa, "prefill_attention_cuda", lambda *a, **k: ran.append("new"))
    monkeypatch.setattr(pak, "paged_attention_cuda", lambda *a, **k: ran.append("old"))
    t = _case(q_lens, [90, 40], kv_dtype)
    md, out = t["md"], t["out"]
    pa.attention_cuda(t["q"], t["kc"], md, AttentionParams(0.125), out, None, choice, "old")
    assert ran == [want]


def test_unsupported_reasons() -> None:
    t = _case([5], [9])
    md = t["md"]
    assert pa.unsupported_reason(t["q"], t["kc"], md) is None
    assert "CUDA" in str(pa.unsupported_reason(t["q"].as_subclass(torch.Tensor), t["kc"], md))
    odd = torch.zeros(2, 10, 24, 2, 64, dtype=torch.bfloat16)
    assert "power of two" in str(pa.unsupported_reason(t["q"], odd, md))
    huge = AttentionMetadata(
        md.query_start_loc, md.seq_lens, md.block_tables, md.slot_mapping, 2_000_000, 9
    )
    assert "row tiles" in str(pa.unsupported_reason(t["q"], t["kc"], huge))
    wide = torch.zeros(5, 8, 96, dtype=torch.bfloat16).as_subclass(_OnDevice)
    assert "head_dim" in str(
        pa.unsupported_reason(wide, torch.zeros(2, 10, 32, 2, 96, dtype=torch.bfloat16), md)
    )


def test_smem_opt_in_calls_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    from cuda.bindings import driver

    calls: list[tuple[Any, ...]] = []
    ok = driver.CUresult.CUDA_SUCCESS
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(driver, "cuDeviceGet", lambda ordinal: (ok, f"dev{ordinal}"))

    def set_attribute(*a: Any) -> tuple[Any]:
        calls.append(a)
        return (ok,)

    monkeypatch.setattr(driver, "cuKernelSetAttribute", set_attribute)

    class FakeKernel:
        handle = "kernel-handle"

    kernel = FakeKernel()
    pa._allow_smem(kernel, 100352)
    pa._allow_smem(kernel, 100352)  # once per kernel and device
    attr = driver.CUfunction_attribute
    assert calls == [
        (attr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 100352, "kernel-handle", "dev0"),
        (attr.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100, "kernel-handle", "dev0"),
    ]
    with pytest.raises(ValueError, match="shared memory"):
        pa._allow_smem(FakeKernel(), pa.SMEM_LIMIT + 1)
    bad = driver.CUresult.CUDA_ERROR_INVALID_VALUE
    monkeypatch.setattr(driver, "cuKernelSetAttribute", lambda *a: (bad,))
    with pytest.raises(RuntimeError, match="MAX_DYNAMIC_SHARED"):
        pa._allow_smem(FakeKernel(), 1000)
