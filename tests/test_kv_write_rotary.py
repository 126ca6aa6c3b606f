"""Rotary + KV write in one launch (cuda/kv_write_rotary.py) on CPU: the launch follows the
kernel's parameter list, the layout check takes what the kernel takes, and the reference
path leaves q, k and the cache as rotary-then-write_kv did."""

from __future__ import annotations

import pytest
import torch

from cuda import fused_ops, kv_write_rotary
from cuda.fused_ops import rotary_ref
from cuda.kv_write import write_kv_ref
from tests.kernel_signatures import launch_types


def _case(dtype: torch.dtype = torch.bfloat16, rot: int = 64, t: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    hq, hkv, d = 6, 2, 64
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    freqs = torch.outer(torch.arange(40.0), torch.rand(rot // 2, generator=g))
    return {
        "positions": torch.tensor([3, 0, 39, 7, 12][:t], dtype=torch.int64),
        "q": q.view(t, hq, d),
        "k": k.view(t, hkv, d),
        "v": v.view(t, hkv, d),
        "kv_cache": torch.zeros(2, 4, 16, hkv, d, dtype=dtype),
        "slot_mapping": torch.tensor([5, -1, 63, 0, 17][:t], dtype=torch.int64),
        "cos_sin": torch.cat([freqs.cos(), freqs.sin()], dim=-1),
    }


def test_launch_arguments_follow_the_kernel() -> None:
    c = _case()
    assert kv_write_rotary.fused_supported(**c)
    name, grid, block, args = kv_write_rotary.fused_launch(**c)
    assert name == "rotary_kv_write" and name in fused_ops.KERNELS
    assert [type(a) for a in args] == launch_types(fused_ops.source())[name]
    assert grid == (5, 1) and block == 32  # 8 heads x 4 groups of 8 pairs
    hkv, d = 2, 64
    assert args[12] == 4 * 16 * hkv * d  # V's offset in elements: slots * Hkv * D
    assert args[2] == c["q"].stride(0) == (6 + 4) * d and args[3] == d
    assert args[8] == c["v"].data_ptr() and args[9] == c["v"].stride(0)
    assert args[14] == hkv and args[15] == d and args[19] == 32


def test_layouts_the_kernel_does_not_take() -> None:
    c = _case()
    fp8 = dict(c, kv_cache=c["kv_cache"].to(torch.float8_e4m3fn))
    assert not kv_write_rotary.fused_supported(**fp8)  # FP8 caches: rotary + write_kv
    assert not kv_write_rotary.fused_supported(**dict(c, kv_cache=c["kv_cache"].float()))
    assert not kv_write_rotary.fused_supported(**dict(c, slot_mapping=c["slot_mapping"].int()))
    assert not kv_write_rotary.fused_supported(**dict(c, positions=c["positions"].int()))
    assert not kv_write_rotary.fused_supported(**dict(c, v=c["v"][:, :1]))


@pytest.mark.parametrize("rot", [64, 32])  # full and partial rotary
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_rotary_then_write(rot: int, dtype: torch.dtype) -> None:
    a, b = _case(dtype, rot), _case(dtype, rot)
    kv_write_rotary.rotary_write_kv(**a)
    rotary_ref(b["positions"], b["q"], b["k"], b["cos_sin"])
    write_kv_ref(b["k"], b["v"], b["kv_cache"], b["slot_mapping"])
    for key in ("q", "k", "v", "kv_cache"):
        assert torch.equal(a[key], b[key]), key
    flat = a["kv_cache"].view(2, 64, 2, 64)
    assert torch.equal(flat[0, 63], a["k"][2]) and torch.equal(flat[1, 17], a["v"][4])
    assert not flat[:, 1].any()  # the skipped token's slot was not written


def test_step_fusion_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from cuda.step_fusion import step_fusion

    monkeypatch.delenv("HEADRACE_STEP_FUSION", raising=False)
    assert step_fusion()
    monkeypatch.setenv("HEADRACE_STEP_FUSION", "0")
    assert not step_fusion()
    monkeypatch.setenv("HEADRACE_STEP_FUSION", "off")
    with pytest.raises(ValueError, match="HEADRACE_STEP_FUSION"):
        step_fusion()
