"""A mixed step's decode rows on the decode kernel, its chunks on the prefill kernel
(worker/decode_split.py), on the GPU.

Fresh random mixed steps each run (tests/gpu/test_gpu_prefill_grid.py's StepBatch: pages
shuffled, free pages and page tails NaN): 40-120 decode rows at contexts up to 2k first,
then 2-4 prompt chunks (whole prompts and chunks after cached tokens). The split output,
NaN-poisoned before, against the torch reference (the FlashAttention bar of the prefill
tests) and against the whole step on the prefill kernel; bf16 / fp16, head_dim 64 / 128,
GQA groups 1 / 3 / 4 / 8, FP8 KV, sliding windows, the flat grid's tile map; then greedy
generation with the split equals HEADRACE_MIXED_SPLIT=0 on a tiny GQA model.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from cuda import prefill_tiles as pt
from cuda import prefill_v2 as v2
from cuda.paged_attention import AttentionParams
from tests.gpu.test_gpu_prefill_attention import check, check_fp8, fp8_params
from tests.gpu.test_gpu_prefill_grid import GROUPS, StepBatch
from worker import decode_split as ds
from worker.cuda_attention import CudaAttention
from worker.device_copy import host_to_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16]


def decodes_first(rnd: random.Random) -> list[tuple[int, int]]:
    reqs = [(1, rnd.randint(1, 2000)) for _ in range(rnd.randint(40, 120))]
    for _ in range(rnd.randint(2, 4)):
        q = rnd.choice([2, 63, 129, 300, rnd.randint(2, 700)])
        reqs.append((q, q + rnd.choice([0, 0, 17, rnd.randint(1, 1500)])))
    return reqs


def new_batch(rnd: random.Random, group: int, head_dim: int, dtype: torch.dtype) -> StepBatch:
    return StepBatch(
        decodes_first(rnd),
        num_kv_heads=rnd.choice([1, 2]),
        group=group,
        head_dim=head_dim,
        block_size=rnd.choice([16, 32]),
        dtype=dtype,
    )


def run_split(
    batch: StepBatch, params: AttentionParams, tiles: pt.TileSpec | None = None
) -> torch.Tensor:
    md = batch.metadata()
    qsl, seq = md.query_start_loc.cpu().numpy(), md.seq_lens.cpu().numpy()

    def dev(a: object) -> torch.Tensor:
        return host_to_device(torch.from_numpy(a), batch.q.device)  # type: ignore[arg-type]

    split = ds.split_metadata(md, qsl, seq, dev, tiles)
    assert split is not None and split.num_decodes == sum(q == 1 for q, _ in batch.reqs)
    out = torch.full_like(batch.q, float("nan"))
    ds.attend_split(CudaAttention().attend, batch.q, batch.kv_cache, split, params, out)
    torch.cuda.synchronize()
    return out


def whole(batch: StepBatch, params: AttentionParams) -> torch.Tensor:
    out = torch.full_like(batch.q, float("nan"))
    CudaAttention().attend(batch.q, batch.kv_cache, batch.metadata(), params, out)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_split_equals_the_reference(dtype: torch.dtype, head_dim: int, group: int) -> None:
    batch = new_batch(random.Random(), group, head_dim, dtype)
    params = AttentionParams(batch.scale)
    out = run_split(batch, params)
    check(batch, out)
    check(batch, whole(batch, params))
    # two kernels' rounding apart, not more
    assert (out.float() - whole(batch, params).float()).abs().max().item() < 2e-2


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_fp8_split_equals_the_reference(dtype: torch.dtype, head_dim: int) -> None:
    rnd = random.Random()
    batch = new_batch(rnd, rnd.choice(GROUPS), head_dim, dtype)
    params = fp8_params(rnd, batch)
    check_fp8(batch, run_split(batch, params), params)


@pytest.mark.parametrize("window", [1, 37, 256])
def test_sliding_window(window: int) -> None:
    rnd = random.Random()
    batch = new_batch(rnd, rnd.choice(GROUPS), 128, torch.bfloat16)
    check(batch, run_split(batch, AttentionParams(batch.scale, window)), window)


def test_split_with_the_flat_grid_tile_map() -> None:
    rnd = random.Random()
    group = rnd.choice(GROUPS)
    batch = new_batch(rnd, group, 128, torch.bfloat16)
    spec = pt.TileSpec(group, v2.DEFAULT_CONFIG.block_m)
    check(batch, run_split(batch, AttentionParams(batch.scale), spec))


def test_greedy_generation_with_the_split_equals_without(
    tmp_path: Path, stories_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked prompts beside decoding requests (mixed eager steps) on a tiny GQA model:
    the split runs in those steps, and its run is as close to the CPU's fp32 run as the run
    without it (fp16 on this peaked random model with prompts up to 300 tokens moves
    logprobs by ~0.15 either way, so the two GPU runs are held to the truth, not to each
    other: tokens equal but for near-ties, and the split's largest logprob deviation at most
    twice the unsplit one's plus 0.05; a wrong split is off by far more)."""
    pytest.importorskip("transformers")
    from tests.gpu.helpers import MIXED_STEP_ARGS, generate, mixed_step_prompts
    from tests.tiny_models import tiny_gqa_model

    path = tiny_gqa_model(tmp_path, stories_path)
    prompts = mixed_step_prompts(7)
    cpu = generate(path, prompts, max_tokens=24, device="cpu", **MIXED_STEP_ARGS)
    args = dict(
        device="cuda",
        dtype="float16",
        enforce_eager=True,  # every step through the eager path, where the split lives
        **MIXED_STEP_ARGS,
    )
    monkeypatch.setenv(ds.ENV, "0")
    off = generate(path, prompts, max_tokens=24, **args)
    calls: list[int] = []
    real = ds.attend_split

    def counted(*a: object, **k: object) -> torch.Tensor:
        calls.append(a[3].num_decodes)  # type: ignore[attr-defined]
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr("worker.attention.attend_split", counted)
    monkeypatch.setenv(ds.ENV, "1")
    on = generate(path, prompts, max_tokens=24, **args)
    assert calls, "no step split its decode rows off"
    whole_dev = max_deviation(off.out, cpu.out, "whole-vs-cpu")
    split_dev = max_deviation(on.out, cpu.out, "decode-split-vs-cpu")
    assert split_dev <= 2 * whole_dev + 0.05, (split_dev, whole_dev)


Run = list[tuple[list[int], list[dict[int, float]]]]


def max_deviation(ours: Run, truth: Run, name: str) -> float:
    """The largest |logprob difference| over the top logprobs both sides list, per sequence
    up to its first token that differs (which must be a near-tie: each side's choice in the
    other's top logprobs), as tests/test_golden.py's check_logprobs_close walks them."""
    worst = 0.0
    for i, ((o_toks, o_lps), (t_toks, t_lps)) in enumerate(zip(ours, truth, strict=True)):
        for pos, (ot, tt) in enumerate(zip(o_toks, t_toks, strict=True)):
            o_top, t_top = o_lps[pos], t_lps[pos]
            if ot != tt:
                assert ot in t_top and tt in o_top, f"{name} prompt {i} pos {pos}: not a near-tie"
                break
            for tok, lp in t_top.items():
                if tok in o_top:
                    worst = max(worst, abs(o_top[tok] - lp))
    return worst
