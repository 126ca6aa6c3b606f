"""Prefill attention's routing and host checks (cuda/prefill_attention.py) and the prefill
kernel's tile schedule, on CPU. The kernel is round 2 (cuda/prefill_v2.py,
cuda/prefill_attention_v2.cu); its launch arguments, dispatch table and inner-loop emulations
are in tests/test_prefill_v2.py and tests/test_prefill_v2_emulation.py, fragment addressing in
tests/test_prefill_fragments.py, the GPU half in tests/gpu/test_gpu_prefill_v2.py.

`block_schedule` transcribes the kernel's per-block index math (prefill_v2_impl's preamble
and masking test); the tests check that the tiles it computes cover exactly the visible
(row, key) pairs and that only flagged tiles can hold hidden pairs, for each (BM, BN) of
round 2's configurations.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from cuda import prefill_attention as pa
from cuda import prefill_v2 as v2
from cuda.paged_attention import AttentionMetadata, causal_mask


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


# The (BM, BN) tiles round 2's configurations cut (warps, stages and SUB do not move them).
TILES = sorted({(c.block_m, c.block_n) for c in v2.CONFIGS})


@pytest.mark.parametrize(("bm", "bn"), TILES, ids=[f"m{m}n{n}" for m, n in TILES])
def test_tiles_cover_exactly_the_visible_pairs(bm: int, bn: int) -> None:
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


def test_env_choice() -> None:
    assert pa.choice_from_env({}) == "v2"  # round 2 in its DEFAULT_CONFIG
    assert pa.choice_from_env({pa.ENV: ""}) == "v2"
    assert pa.choice_from_env({pa.ENV: "new"}) == "v2"  # the alias (see pa.ALIASES)
    assert pa.choice_from_env({pa.ENV: "old"}) == "old"
    for name in v2.BY_NAME:
        assert pa.choice_from_env({pa.ENV: name}) == name
    # the removed first tile kernel's configuration names, and anything else, are refused
    for value in ("m128n64w8s2", "m128n128w8s2", "m64n64w4s2", "fast"):
        with pytest.raises(ValueError, match="HEADRACE_PREFILL_KERNEL") as err:
            pa.choice_from_env({pa.ENV: value})
        assert all(word in str(err.value) for word in ("v2", "old", *v2.BY_NAME))


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


def test_unsupported_reasons() -> None:
    t = _case([5], [9])
    md = t["md"]
    assert pa.unsupported_reason(t["q"], t["kc"], md) is None
    assert "CUDA" in str(pa.unsupported_reason(t["q"].as_subclass(torch.Tensor), t["kc"], md))
    odd = torch.zeros(2, 10, 24, 2, 64, dtype=torch.bfloat16)
    assert "power of two" in str(pa.unsupported_reason(t["q"], odd, md))

    def bound(max_query_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            md.query_start_loc, md.seq_lens, md.block_tables, md.slot_mapping, max_query_len, 9
        )

    # group 4: the grid's z holds MAX_GRID_Z tiles of round 2's 128 rows, 32 tokens each
    bm = min(c.block_m for c in v2.CONFIGS)
    assert bm == 128
    last = pa.MAX_GRID_Z * bm // 4
    assert pa.unsupported_reason(t["q"], t["kc"], bound(last)) is None
    assert "row tiles" in str(pa.unsupported_reason(t["q"], t["kc"], bound(last + 1)))
    assert v2.launch_grid(v2.DEFAULT_CONFIG, last, 4, 2, 1) == (2, 1, pa.MAX_GRID_Z)
    fp8 = torch.zeros(2, 10, 32, 2, 64, dtype=torch.float8_e4m3fn)
    assert "differs" in str(pa.unsupported_reason(t["q"], fp8, md))
    assert pa.unsupported_reason(t["q"], fp8, md, fp8_ok=True) is None
    assert "num_q_heads" in str(
        pa.unsupported_reason(t["q"], torch.zeros(2, 10, 32, 3, 64, dtype=torch.bfloat16), md)
    )
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
