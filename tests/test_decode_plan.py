"""The tensor-core decode kernel's host-side sizing (cuda/decode_attention.py), on CPU: the
split plan for the benchmark's cells and its rules, and a twin of the device's split_range
(cuda/decode_attention.cu) checked over lengths, windows and bounds."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cuda import decode_attention as da

H200_SMS = 132


@pytest.mark.parametrize(
    ("batch", "ctx", "splits"),
    [(64, 1024, 1), (64, 4096, 1), (64, 16384, 1), (8, 16384, 8), (1, 1024, 8), (1, 65536, 60)],
)
def test_llama3_8b_cells(batch: int, ctx: int, splits: int) -> None:
    # 8 KV heads, group 4, 4 blocks per SM (48 KB of shared memory each): 528 slots.
    plan = da.plan_decode(batch, 8, 4, ctx, H200_SMS, 4)
    assert plan.splits == splits and plan.slots == 528
    assert plan.blocks == batch * 8 * splits and plan.merge == (splits > 1)
    assert plan.min_chunk == da.MIN_CHUNK


@pytest.mark.parametrize(
    ("batch", "ctx", "splits"),
    [(64, 1024, 3), (64, 4096, 3), (64, 16384, 3), (8, 16384, 6), (1, 131072, 45), (1, 256, 2)],
)
def test_llama3_8b_cells_round2(batch: int, ctx: int, splits: int) -> None:
    """A variant with 3 blocks per SM (w4s2: 4 warps, 64 KB), 396 slots; batch 64 takes 3
    splits (1,536 blocks, 3.9 waves at 97%) where 1 split would leave its second wave 29%
    full; a batch-1 graph bound gets 45, of which a 128-token context uses 1."""
    plan = da.plan_decode(batch, 8, 4, ctx, H200_SMS, 3)
    assert plan.splits == splits and plan.slots == 396


def test_batch_64_fills_one_wave_without_splitting() -> None:
    plan = da.plan_decode(64, 8, 4, 131072, H200_SMS, 4)  # a graph's bound: still 1 split
    assert plan.splits == 1 and plan.blocks / plan.slots > 0.9


def test_large_groups_take_chunks_of_8_heads() -> None:
    assert da.plan_decode(8, 8, 16, 16384, H200_SMS, 4).blocks == 8 * 8 * 2 * 4
    assert da.plan_decode(8, 8, 7, 16384, H200_SMS, 4).blocks == 8 * 8 * 8


def test_occupancy_beyond_saturation_is_not_counted() -> None:
    assert da.plan_decode(8, 8, 4, 16384, H200_SMS, 9) == da.plan_decode(
        8, 8, 4, 16384, H200_SMS, 4
    )
    assert da.plan_decode(8, 8, 4, 16384, 66, 2).slots == 132


@pytest.mark.parametrize("field", ["batch", "num_kv_heads", "group", "num_sms", "blocks_per_sm"])
def test_bad_inputs_name_the_field(field: str) -> None:
    args = {"batch": 8, "num_kv_heads": 8, "group": 4, "num_sms": 132, "blocks_per_sm": 4}
    args[field] = 0
    with pytest.raises(ValueError, match=field):
        da.plan_decode(max_seq_len=1024, **args)


def test_config_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(da.CONFIG_ENV, raising=False)
    monkeypatch.setenv(da.PLAN_ENV, "v2")  # the fixed variants (v3: tests/test_decode_plan3.py)
    assert da.config_for(2) == da.DecodeConfig(2, 3) and da.config_for(1) == da.DecodeConfig(4, 4)
    assert (
        da.config_for(2).smem_bytes(128, 2) == 49152
        and da.config_for(1).smem_bytes(128, 1) == 65536
    )
    monkeypatch.setenv(da.CONFIG_ENV, " W2S3 ")
    assert da.config_for(1) == da.config_for(2) == da.DecodeConfig(2, 3)
    assert da.config_for(2).threads == 64 and da.config_for(2).name == "w2s3"
    assert all(da.parse_config(c).name == c for c in da.CONFIGS)
    defines = da.module_defines(torch.float16, 64, da.DecodeConfig(3, 5))
    assert defines == {"HR_BF16": 0, "HR_HEAD_DIM": 64, "HR_DECODE_WARPS": 3, "HR_DECODE_STAGES": 5}


def test_kernel_choice_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(da.ENV, raising=False)
    assert da.kernel_choice() == "auto" and da.applies(16) == da.AUTO_16BIT
    assert da.applies(16, kv_fp8=True) and not da.applies(8, kv_fp8=True)
    monkeypatch.setattr(da, "AUTO_16BIT", False)  # the one-line fallback: 16-bit KV on old
    assert not da.applies(16) and da.applies(16, kv_fp8=True)
    monkeypatch.setenv(da.ENV, "new")
    assert da.kernel_choice() == "new" and da.applies(16) and not da.applies(8)
    monkeypatch.setenv(da.ENV, "OLD")
    assert da.kernel_choice() == "old" and not da.applies(16)
    monkeypatch.setenv(da.ENV, "fast")
    with pytest.raises(ValueError, match=da.ENV):
        da.kernel_choice()


@settings(max_examples=300, deadline=None)
@given(
    batch=st.integers(1, 300),
    hkv=st.integers(1, 16),
    group=st.integers(1, 20),
    bound=st.integers(0, 200_000),
    sms=st.integers(1, 200),
    per_sm=st.integers(1, 8),
)
def test_plan_is_the_fewest_splits_that_fill_the_wave(batch, hkv, group, bound, sms, per_sm):
    plan = da.plan_decode(batch, hkv, group, bound, sms, per_sm)
    limit = max(1, min(da.MAX_SPLITS, math.ceil(max(bound, 1) / da.MIN_CHUNK)))
    assert 1 <= plan.splits <= limit
    pairs = batch * hkv * math.ceil(group / 8)

    def eff(s: int) -> float:
        return pairs * s / (math.ceil(pairs * s / plan.slots) * plan.slots)

    assert all(eff(s) < da.FULL_WAVE for s in range(1, plan.splits))
    if eff(plan.splits) < da.FULL_WAVE:  # none fills it: the fullest within the limit
        assert all(eff(s) <= eff(plan.splits) for s in range(1, limit + 1))


def split_range(seq_len: int, window: int, max_splits: int, min_chunk: int):
    """Twin of split_range in cuda/decode_attention.cu (kept equal by the test below)."""
    lo = max(0, seq_len - window) if window > 0 else 0
    first = lo & ~15
    span = seq_len - first
    n = max(1, min(-(-span // min_chunk), max_splits))
    chunk = -(-span // n)
    chunk = (chunk + 15) & ~15
    return lo, first, -(-span // chunk), chunk


def test_device_split_range_is_the_twin() -> None:
    body = re.search(r"void split_range\(.*?\n}\n", da.source(), re.S)
    assert body is not None
    text = " ".join(body.group(0).split())
    for line in (
        "lo = window > 0 ? max(0, seq_len - window) : 0;",
        "first = lo & ~(TILE - 1);",
        "const int span = seq_len - first;",
        "int n = (span + min_chunk - 1) / min_chunk;",
        "n = max(1, min(n, max_splits));",
        "chunk = (span + n - 1) / n;",
        "chunk = (chunk + TILE - 1) & ~(TILE - 1);",
        "nsplit = (span + chunk - 1) / chunk;",
    ):
        assert line in text, line


@settings(max_examples=500, deadline=None)
@given(
    seq_len=st.integers(1, 140_000),
    window=st.sampled_from([0, 0, 1, 15, 16, 17, 4096, 100_000]),
    max_splits=st.integers(1, da.MAX_SPLITS),
)
def test_splits_tile_the_visible_keys(seq_len: int, window: int, max_splits: int) -> None:
    lo, first, nsplit, chunk = split_range(seq_len, window, max_splits, da.MIN_CHUNK)
    assert 1 <= nsplit <= max_splits and chunk % 16 == 0 and first % 16 == 0
    assert first <= lo < seq_len and lo - first < 16
    assert first + (nsplit - 1) * chunk < seq_len <= first + nsplit * chunk
    # Every split owns at least one visible key: none writes an empty partial.
    for s in range(nsplit):
        begin, end = first + s * chunk, min(seq_len, first + (s + 1) * chunk)
        assert max(begin, lo) < end
    if nsplit > 1:
        assert chunk >= da.MIN_CHUNK // 2


def test_merge_counters_grow_keep_old_and_refuse_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused merge's counters: zeroed once, grown outside capture only (the old buffer
    kept: a graph may point at it), 0 (the merge kernel) when capture finds too few."""
    monkeypatch.setattr(da, "_counters", {})
    monkeypatch.setattr(da, "_old_counters", [])
    dev = torch.device("cpu")
    first = da.merge_counters(dev, 10)
    assert first == da._counters["cpu"].data_ptr() and da._counters["cpu"].numel() == da.COUNTERS
    assert da.merge_counters(dev, da.COUNTERS) == first  # big enough: the same buffer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert da.merge_counters(dev, da.COUNTERS + 1) == 0  # capturing: no allocation
    assert da.merge_counters(dev, 5) == first
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    grown = da.merge_counters(dev, da.COUNTERS + 1)
    assert grown != 0 and not da._counters["cpu"].any() and len(da._old_counters) == 1


@pytest.mark.parametrize(
    ("value", "fused"), [("", True), ("1", True), ("0", False), ("false", False)]
)
def test_fused_merge_env(monkeypatch: pytest.MonkeyPatch, value: str, fused: bool) -> None:
    monkeypatch.setenv(da.FUSED_MERGE_ENV, value)
    assert da.fused_merge() == fused


def test_fused_merge_env_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(da.FUSED_MERGE_ENV, "maybe")
    with pytest.raises(ValueError, match=da.FUSED_MERGE_ENV):
        da.fused_merge()
