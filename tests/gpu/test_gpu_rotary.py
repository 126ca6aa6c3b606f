"""The rotary kernels (`rotary`, `rotary_kv_write` in cuda/fused_ops.cu) against their torch
references, bit for bit, on the layouts that pick each of their paths.

The kernels rotate VP adjacent pairs a thread: 16 bytes of elements where half, head_dim,
the strides and pointers allow it, else 2, else 1. So the cases cover all three widths (a
qkv buffer shifted by 2 or 1 elements, a rotated half of 6 or 5 pairs), partial rotary (64
of 128 dims), head counts that leave a thread's last batch of 4 heads part empty, T from 1
to 4099 (one head a thread below ~131k pair groups, 4 above), positions outside the table
(left unrotated, their K rows cached unrotated) and slots < 0 (not written). q, k and v
are slices of one fused qkv row, as the model passes them; v is NaN for `rotary` (it must
stay NaN) and every cache slot starts NaN (a slot the kernel should write and does not stays
NaN and fails the exact comparison). The references are patched to raise during the kernel
call, so a silent fallback fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from cuda import fused_ops as fo
from cuda import kv_write_rotary
from cuda.kv_write import write_kv_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = "cuda"
ROTARY_REF = fo.rotary_ref
MAX_POS = 5000

# (hq, hkv, head_dim, rotated dims): Llama-3-8B / 70B, odd head counts, partial rotary 64 of
# 128, a rotated half of 6 pairs (VP 2) and of 5 (VP 1), a head_dim of 96.
SHAPES = [
    (32, 8, 128, 128),
    (64, 8, 128, 128),
    (7, 3, 128, 128),
    (6, 1, 128, 64),
    (5, 3, 64, 12),
    (3, 1, 64, 10),
    (9, 2, 96, 96),
]
TOKENS = [1, 3, 880, 4099]


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("fell back to the torch reference")

    monkeypatch.setattr(fo, "rotary_ref", boom)
    monkeypatch.setattr(kv_write_rotary, "rotary", boom)
    monkeypatch.setattr(kv_write_rotary, "write_kv", boom)
    yield


def _table(rot: int) -> torch.Tensor:
    inv = 1.0 / (500000.0 ** (torch.arange(0, rot, 2, device=DEV).float() / rot))
    freqs = torch.outer(torch.arange(MAX_POS, device=DEV).float(), inv)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [MAX_POS, rot] fp32


def _case(
    dtype: torch.dtype, hq: int, hkv: int, d: int, rot: int, t: int, shift: int = 0
) -> dict[str, Any]:
    """q, k, v as views of one qkv buffer whose rows start `shift` elements past 16-byte
    alignment; positions with some outside the table, slots with some < 0."""
    width = (hq + 2 * hkv) * d
    flat = torch.randn(t * width + shift, device=DEV).to(dtype)
    qkv = flat[shift:].view(t, width)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    positions = torch.randint(0, MAX_POS, (t,), device=DEV)
    positions[1::7] = -1
    positions[2::11] = MAX_POS
    positions[4::13] = 2**40
    block = 16
    num_blocks = -(-t // block) + 2
    slots = torch.randperm(num_blocks * block, device=DEV)[:t]
    slots[3::5] = -1
    cache = torch.full((2, num_blocks, block, hkv, d), float("nan"), device=DEV).to(dtype)
    return {
        "positions": positions,
        "q": q.view(t, hq, d),
        "k": k.view(t, hkv, d),
        "v": v.view(t, hkv, d),
        "kv_cache": cache,
        "slot_mapping": slots,
        "cos_sin": _table(rot),
    }


def _reference(c: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The reference on copies: tokens outside the table left as they are (the reference
    itself would raise on them), then the KV write of the (partly) rotated K."""
    q, k, v = c["q"].clone(), c["k"].clone(), c["v"].clone()
    pos = c["positions"]
    inside = (pos >= 0) & (pos < c["cos_sin"].shape[0])
    iq, ik = q[inside], k[inside]
    ROTARY_REF(pos[inside], iq, ik, c["cos_sin"])
    q[inside], k[inside] = iq, ik
    cache = c["kv_cache"].clone()
    write_kv_ref(k, v, cache, c["slot_mapping"])
    return {"q": q, "k": k, "v": v, "kv_cache": cache}


def _expected_vp(dtype: torch.dtype, rot: int, shift: int) -> int:
    vec = 16 // torch.empty(0, dtype=dtype).element_size()
    half = rot // 2
    for vp in (vec, 2):
        if half % vp == 0 and shift % vp == 0:
            return vp
    return 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "d", "rot"), SHAPES)
@pytest.mark.parametrize("t", TOKENS)
def test_rotary_exact(
    no_fallback: None, dtype: torch.dtype, hq: int, hkv: int, d: int, rot: int, t: int
) -> None:
    torch.manual_seed(hq * 1000 + rot + t)
    c = _case(dtype, hq, hkv, d, rot, t)
    c["v"].fill_(float("nan"))
    want = _reference(c)
    assert fo.rotary_supported(c["positions"], c["q"], c["k"], c["cos_sin"])
    half = rot // 2
    vp = fo.rotary_pairs_per_thread(half, c["q"], c["k"], c["cos_sin"])
    assert vp == _expected_vp(dtype, rot, 0)
    fo.rotary(c["positions"], c["q"], c["k"], c["cos_sin"])
    assert torch.equal(c["q"], want["q"]) and torch.equal(c["k"], want["k"])
    assert c["v"].isnan().all(), "v was written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "d", "rot"), SHAPES)
@pytest.mark.parametrize("t", TOKENS)
def test_rotary_kv_write_exact(
    no_fallback: None, dtype: torch.dtype, hq: int, hkv: int, d: int, rot: int, t: int
) -> None:
    torch.manual_seed(hq * 1000 + rot + t + 1)
    c = _case(dtype, hq, hkv, d, rot, t)
    want = _reference(c)
    assert kv_write_rotary.fused_supported(**c)
    kv_write_rotary.rotary_write_kv(**c)
    _check_kv(c, want)


def _check_kv(got: dict[str, Any], want: dict[str, torch.Tensor]) -> None:
    for key in ("q", "k", "v"):
        assert torch.equal(got[key], want[key]), key
    # NaN exactly where neither side wrote; every written slot bit-equal.
    torch.testing.assert_close(got["kv_cache"], want["kv_cache"], rtol=0, atol=0, equal_nan=True)
    written = got["slot_mapping"] >= 0
    flat = got["kv_cache"].flatten(1, 2)
    assert not flat[:, got["slot_mapping"][written]].isnan().any()


# Rows 2 elements (4 bytes) off alignment take VP 2, 1 element off VP 1; fp32 takes VP 4.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shift", [0, 2, 1])
@pytest.mark.parametrize(("hq", "hkv", "d", "rot"), [(32, 8, 128, 128), (6, 1, 128, 64)])
@pytest.mark.parametrize("t", [3, 880])
def test_rotary_misaligned_rows(
    no_fallback: None,
    dtype: torch.dtype,
    shift: int,
    hq: int,
    hkv: int,
    d: int,
    rot: int,
    t: int,
) -> None:
    torch.manual_seed(shift * 100 + t)
    c = _case(dtype, hq, hkv, d, rot, t, shift)
    want = _reference(c)
    q, k, cs = c["q"], c["k"], c["cos_sin"]
    expected = _expected_vp(dtype, rot, shift)
    assert fo.rotary_pairs_per_thread(rot // 2, q, k, cs) == expected
    fo.rotary(c["positions"], q, k, cs)
    assert torch.equal(q, want["q"]) and torch.equal(k, want["k"])
    # rotary_kv_write on a fresh case with the same layout (the cache is aligned; v is not).
    c = _case(dtype, hq, hkv, d, rot, t, shift)
    want = _reference(c)
    vp = fo.rotary_pairs_per_thread(rot // 2, c["q"], c["k"], cs, c["v"], c["kv_cache"])
    assert vp == expected
    kv_write_rotary.rotary_write_kv(**c)
    _check_kv(c, want)


def test_rotary_kv_write_in_cuda_graph(no_fallback: None) -> None:
    """Captured once at 880 tokens, replayed on new positions, slots and qkv: the same
    result as the eager call (no host sync or per-call allocation in the launch)."""
    dtype, hq, hkv, d, t = torch.bfloat16, 32, 8, 128, 880
    c = _case(dtype, hq, hkv, d, d, t)
    qkv_width = (hq + 2 * hkv) * d
    qkv = c["q"].as_strided((t, qkv_width), (qkv_width, 1))

    def call() -> None:
        kv_write_rotary.rotary_write_kv(**c)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and load the module outside the capture
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for seed in range(3):
        torch.manual_seed(seed)
        fresh = _case(dtype, hq, hkv, d, d, t)
        qkv.copy_(fresh["q"].as_strided((t, qkv_width), (qkv_width, 1)))
        c["positions"].copy_(fresh["positions"])
        c["slot_mapping"].copy_(fresh["slot_mapping"])
        c["kv_cache"].fill_(float("nan"))
        want = _reference(c)
        graph.replay()
        torch.cuda.synchronize()
        _check_kv(c, want)
