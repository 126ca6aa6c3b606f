"""Decode plan v3 (cuda/decode_plan3.py, HEADRACE_DECODE_PLAN=v3) on CPU: why batch 1 in a
long-bound graph paid for merges under v2, which variant and split count v3 picks for the
measured cells, and that plan_for / the workspace see the same plan."""

from __future__ import annotations

import pytest
import torch

from cuda import decode_attention as da
from cuda import decode_plan3 as p3
from cuda import paged_attention_kernels as pak
from tests.test_decode_plan import split_range

SMS = 132
# Blocks per SM of each variant on the H200 (ptxas: decode_tc 153-155 registers, the FP8
# kernels 127; 227 KB of shared memory): w2s3 bf16 4 (48 KB), w4s3 bf16 3 (registers),
# w4s4 bf16 / FP8 3, w4s3 FP8 4 (48 KB, 128 registers).
PER_SM = {("w2s3", 2): 4, ("w4s3", 2): 3, ("w4s4", 1): 3, ("w4s3", 1): 4, ("w4s2", 2): 3}


def name(warps_stages: tuple[int, int]) -> str:
    return "w{}s{}".format(*warps_stages)


def used_splits(seq_len: int, grid: int, min_chunk: int) -> int:
    return split_range(seq_len, 0, grid, min_chunk)[2]


def test_v2_batch1_graph_merges_every_context_past_128() -> None:
    """W1's graphs: batch 1, bound 8,192 (the model's max_model_len), w2s3: a 60-split grid
    and 128-token splits, so the profile's contexts (129 .. 384) run 2-3 splits and a merge;
    only exactly 128 (the benchmark's cell) runs one."""
    plan = da.plan_decode(1, 8, 4, 8192, SMS, PER_SM["w2s3", 2])
    assert plan.splits == 60 and plan.min_chunk == 128
    assert used_splits(128, plan.splits, plan.min_chunk) == 1
    assert [used_splits(c, 60, 128) for c in (129, 150, 256, 257, 384, 1024)] == [2, 2, 2, 3, 3, 8]
    assert da.plan_decode(1, 8, 4, 131072, SMS, 4).splits == 60  # the benchmark's 128k bound


@pytest.mark.parametrize(
    ("batch", "ctx", "config", "splits"),
    [(64, 1024, "w2s3", 1), (64, 4096, "w2s3", 1), (64, 16384, "w2s3", 1), (8, 16384, "w4s3", 6)],
)
def test_v3_bf16_cells_pick_the_measured_best(
    batch: int, ctx: int, config: str, splits: int
) -> None:
    """H200, cc98fa0 (BENCHMARKS, decode round 2): w2s3 76.9 / 90.2 / 93.9% at batch 64, w4s3
    83.4% at 8 x 16k (w2s3 79.4), each at the split count plan v2 gave that variant."""
    cfg = name(p3.pick(2, batch * 8, SMS))
    assert cfg == config
    w, s = int(cfg[1]), int(cfg[3])
    plan = da.plan_decode(batch, 8, 4, ctx, SMS, PER_SM[cfg, 2])
    assert plan.splits == splits
    chunk = p3.min_chunk(plan.splits, w, s)
    assert used_splits(ctx, plan.splits, chunk) == used_splits(ctx, plan.splits, da.MIN_CHUNK)


@pytest.mark.parametrize(
    ("batch", "ctx", "v2_splits", "v3"),
    [
        (64, 1024, 3, "w4s3"),
        (256, 1024, 2, "w4s3"),
        (512, 2048, 1, "w4s3"),
        (1024, 1536, 1, "w4s3"),
        (8, 16384, 6, "w4s4"),
        (1, 8192, 45, "w4s4"),
    ],
)
def test_v3_fp8_fills_large_batches_with_one_split(
    batch: int, ctx: int, v2_splits: int, v3: str
) -> None:
    """FP8's w4s4 (396 slots) splits batch 64 in three and 256 in two (a merge per request;
    512 and 1024 run 10.3 and 20.7 waves of it); w4s3 at 4 blocks an SM runs every large
    batch in one split (waves 97% full), whatever the graph's bound."""
    assert da.plan_decode(batch, 8, 4, ctx, SMS, PER_SM["w4s4", 1]).splits == v2_splits
    assert name(p3.pick(1, batch * 8, SMS)) == v3
    if v3 == "w4s3":
        for bound in (ctx, 8192, 131072):
            assert da.plan_decode(batch, 8, 4, bound, SMS, PER_SM["w4s3", 1]).splits == 1


@pytest.mark.parametrize(("kv_bytes", "chunk"), [(2, 384), (1, 512)])
def test_v3_batch1_short_contexts_run_one_split(kv_bytes: int, chunk: int) -> None:
    w, s = p3.pick(kv_bytes, 8, SMS)
    plan = da.plan_decode(1, 8, 4, 8192, SMS, PER_SM[name((w, s)), kv_bytes])
    assert p3.min_chunk(plan.splits, w, s) == chunk
    assert all(used_splits(c, plan.splits, chunk) == 1 for c in range(1, chunk + 1))
    assert used_splits(1024, plan.splits, chunk) == -(-1024 // chunk)
    # A long request still gets the whole grid: only short ones run fewer splits.
    assert used_splits(131072, plan.splits, chunk) == plan.splits


def test_min_chunk_and_pick_rules() -> None:
    assert p3.min_chunk(1, 4, 4) == 128 and p3.min_chunk(2, 2, 3) == 192
    assert p3.min_chunk(8, 1, 2) == 128
    assert p3.fills_without_splitting(476, SMS) and not p3.fills_without_splitting(475, SMS)
    for bad in ((3, 8, SMS), (2, 0, SMS), (2, 8, 0)):
        with pytest.raises(ValueError):
            p3.pick(*bad)


def test_plan_env_and_fp8_math_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(da.PLAN_ENV, raising=False)
    monkeypatch.delenv(da.FP8_MATH_ENV, raising=False)
    monkeypatch.delenv(da.CONFIG_ENV, raising=False)
    # the defaults since session 8: plan v3, FP8 on fp16 mma
    assert da.plan3() and da.config_for(1, 512, SMS) == da.DecodeConfig(4, 3)
    assert da.kernel_name(True) == "decode_tc_fp8h" and da.kernel_name(False) == "decode_tc"
    monkeypatch.setenv(da.PLAN_ENV, "v2")
    monkeypatch.setenv(da.FP8_MATH_ENV, "auto")
    assert not da.plan3() and da.config_for(1, 512, SMS) == da.DEFAULT_CONFIGS[1]
    assert da.kernel_name(True) == "decode_tc_fp8" and da.kernel_name(False) == "decode_tc"
    monkeypatch.setenv(da.PLAN_ENV, " V3 ")
    assert da.plan3() and da.config_for(1, 512, SMS) == da.DecodeConfig(4, 3)
    assert da.config_for(1) == da.DEFAULT_CONFIGS[1]  # without the grid: the default
    monkeypatch.setenv(da.CONFIG_ENV, "w2s2")  # an explicit variant wins over v3
    assert da.config_for(1, 512, SMS) == da.DecodeConfig(2, 2)
    monkeypatch.setenv(da.FP8_MATH_ENV, "f16")
    assert da.kernel_name(True) == "decode_tc_fp8h" and da.kernel_name(False) == "decode_tc"
    for env in (da.PLAN_ENV, da.FP8_MATH_ENV):
        monkeypatch.setenv(env, "v9")
        with pytest.raises(ValueError, match=env):
            da.plan3() if env == da.PLAN_ENV else da.fp8_math_half()
        monkeypatch.delenv(env)


@pytest.mark.parametrize("fp8", [False, True])
def test_plan_for_and_launch_agree_under_v3(monkeypatch: pytest.MonkeyPatch, fp8: bool) -> None:
    """plan_for (what launch_decode and the workspace sizing use) carries v3's variant and
    chunk; occupancy comes from the compiled kernel, here from PER_SM."""
    monkeypatch.setenv(da.PLAN_ENV, "v3")
    monkeypatch.delenv(da.CONFIG_ENV, raising=False)
    monkeypatch.setattr(pak, "num_sms", lambda device: SMS)
    monkeypatch.setattr(da, "_kernel", lambda dtype, head_dim, name, cfg: (name, cfg))

    def per_sm(kernel: tuple, device: torch.device, key: str) -> int:
        name, cfg = kernel
        assert key.endswith(f"{cfg.name}-{name}")
        return PER_SM[cfg.name, 1 if fp8 else 2]

    monkeypatch.setattr(da, "_slots_per_sm", per_sm)
    dev = torch.device("cpu")
    big = da.plan_for(torch.bfloat16, 128, 256, 8, 4, 8192, dev, fp8)
    assert big.config == (da.DecodeConfig(4, 3) if fp8 else da.DecodeConfig(2, 3))
    assert big.splits == 1 and big.min_chunk == 128
    one = da.plan_for(torch.bfloat16, 128, 1, 8, 4, 8192, dev, fp8)
    assert one.config == (da.DecodeConfig(4, 4) if fp8 else da.DecodeConfig(4, 3))
    assert one.min_chunk == (512 if fp8 else 384) and one.splits == 45  # 3 blocks an SM
    assert da.plan_for(torch.bfloat16, 128, 1, 8, 4, 8192, dev, fp8) == one
    monkeypatch.setenv(da.PLAN_ENV, "v2")
    v2 = da.plan_for(torch.bfloat16, 128, 1, 8, 4, 8192, dev, fp8)
    assert v2.min_chunk == 128 and v2.config == da.DEFAULT_CONFIGS[1 if fp8 else 2]


def test_v3_compiles_its_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = da.DecodeConfig(2, 3)
    monkeypatch.setenv(da.PLAN_ENV, "v2")
    assert "HR_DECODE_MERGE3" not in da.module_defines(torch.bfloat16, 128, cfg)
    assert da.module_defines(torch.bfloat16, 128, cfg, merge3=True)["HR_DECODE_MERGE3"] == 1
    monkeypatch.setenv(da.PLAN_ENV, "v3")
    assert da.module_defines(torch.bfloat16, 128, cfg)["HR_DECODE_MERGE3"] == 1
    assert "HR_DECODE_MERGE3" not in da.module_defines(torch.bfloat16, 128, cfg, merge3=False)
