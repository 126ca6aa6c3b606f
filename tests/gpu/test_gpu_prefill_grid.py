"""Prefill round 2's flat grid (HEADRACE_PREFILL_GRID=flat, cuda/prefill_tiles.py) on the GPU.

Fresh random mixed batches each run, shaped like a serving step: many decode rows (q_len 1
at contexts up to 2k) beside a few prefill chunks (whole prompts and chunks after cached
tokens, lengths off the tile and page sizes) and zero-length padding entries, shuffled.
The z grid and the flat grid run the same per-tile math, so their outputs must be equal bit
for bit; both are checked against the torch reference (FlashAttention's bar, as in
tests/gpu/test_gpu_prefill_v2.py) with outputs poisoned with NaN, so an unlisted tile shows.
bf16 and fp16, head_dim 64 and 128, block sizes 16 and 32, GQA groups 1 / 3 / 4 / 8, FP8 KV,
sliding windows, every configuration; then greedy generation with the flat grid equals the
default on a tiny random GQA model.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch

from cuda import prefill_tiles as pt
from cuda import prefill_v2 as v2
from cuda.paged_attention import AttentionMetadata, AttentionParams
from tests.gpu.test_gpu_kernels import Batch
from tests.gpu.test_gpu_prefill_attention import check, check_fp8, fp8_params
from worker.device_copy import host_to_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16]
GROUPS = [1, 3, 4, 8]
OTHERS = [c for c in v2.CONFIGS if c != v2.DEFAULT_CONFIG]


def mixed_step(rnd: random.Random) -> list[tuple[int, int]]:
    """(q_len, seq_len) pairs of a mixed step: 40-120 decode rows, 2-4 chunks, padding."""
    reqs = [(1, rnd.randint(1, 2000)) for _ in range(rnd.randint(40, 120))]
    for _ in range(rnd.randint(2, 4)):
        q = rnd.choice([2, 63, 129, 300, rnd.randint(2, 700)])
        reqs.append((q, q + rnd.choice([0, 0, 17, rnd.randint(1, 1500)])))
    reqs += [(0, 0)] * rnd.randint(1, 3)
    rnd.shuffle(reqs)
    return reqs


class StepBatch(Batch):
    """tests/gpu/test_gpu_kernels.py's Batch (pages shuffled, free pages and page tails NaN,
    padding entries' tables on a NaN page), its pages marked per request rather than per
    token and its cache drawn on the GPU: a step of 100 decode rows at 2k contexts is built
    in milliseconds."""

    def __init__(
        self,
        reqs: list[tuple[int, int]],
        *,
        num_kv_heads: int,
        group: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
    ) -> None:
        dev = torch.device("cuda")
        self.reqs = reqs
        nblk = [math.ceil(s / block_size) for _, s in reqs]
        num_blocks = sum(nblk) + 8
        perm = torch.randperm(num_blocks)
        poison_block = int(perm[-1])
        tables = torch.full((len(reqs), max(max(nblk), 1) + 2), poison_block, dtype=torch.int32)
        # drawn on the GPU: a step's cache is ~10^8 elements
        cache = torch.randn(
            2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=dev
        )
        used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
        start = 0
        for r, ((_, s), n) in enumerate(zip(reqs, nblk, strict=True)):
            ids = perm[start : start + n]
            start += n
            tables[r, :n] = ids.to(torch.int32)
            used[ids] = True
            if s % block_size:  # the last page's tail stays NaN
                used[ids[-1], s % block_size :] = False
        cache[:, ~used.to(dev)] = float("nan")
        self.kv_cache = cache
        self.block_tables = tables.to(dev)
        q_lens = [ql for ql, _ in reqs]
        starts = [0, *itertools.accumulate(q_lens)]
        self.query_start_loc = torch.tensor(starts, dtype=torch.int32, device=dev)
        self.seq_lens = torch.tensor([s for _, s in reqs], dtype=torch.int32, device=dev)
        self.q = torch.randn(starts[-1], num_kv_heads * group, head_dim, dtype=dtype, device=dev)
        self.max_query_len = max(q_lens)
        self.max_seq_len = max(s for _, s in reqs)
        self.scale = head_dim**-0.5


def new_batch(
    rnd: random.Random, group: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> Batch:
    return StepBatch(
        mixed_step(rnd),
        num_kv_heads=rnd.choice([1, 2]),
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )


def flat_metadata(batch: Batch, config: v2.V2Config) -> AttentionMetadata:
    """The batch's metadata with the tile map the step inputs would carry."""
    md = batch.metadata()
    spec = pt.TileSpec(batch.q.shape[1] // batch.kv_cache.shape[3], config.block_m)
    tiles = pt.build_tile_map(md.query_start_loc.cpu().numpy(), md.seq_lens.cpu().numpy(), spec)
    md.prefill_tiles = host_to_device(torch.from_numpy(tiles), batch.q.device)
    md.prefill_tile_spec = spec
    assert v2.flat_tiles(md, config, spec.group) is not None  # the launch takes the map
    return md


def run(
    batch: Batch,
    grid: str,
    config: v2.V2Config | None = None,
    params: AttentionParams | None = None,
) -> torch.Tensor:
    config = config or v2.DEFAULT_CONFIG
    out = torch.full_like(batch.q, float("nan"))
    md = flat_metadata(batch, config) if grid == "flat" else batch.metadata()
    assert v2.unsupported_reason(batch.q, batch.kv_cache, md) is None
    v2.prefill_v2_cuda(
        batch.q, batch.kv_cache, md, params or AttentionParams(batch.scale), out, config
    )
    torch.cuda.synchronize()
    return out


def flat_equals_z(
    batch: Batch, config: v2.V2Config | None = None, params: AttentionParams | None = None
) -> torch.Tensor:
    z = run(batch, "z", config, params)
    flat = run(batch, "flat", config, params)
    assert torch.equal(flat, z), f"flat differs from z; reqs {batch.reqs}"
    return flat


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_flat_equals_z_and_the_reference(
    dtype: torch.dtype, head_dim: int, group: int, block_size: int
) -> None:
    batch = new_batch(random.Random(), group, head_dim, block_size, dtype)
    check(batch, flat_equals_z(batch))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_fp8_flat_equals_z_and_the_reference(dtype: torch.dtype, head_dim: int) -> None:
    # the reference runs on the CPU here (check_fp8): four cases, groups drawn
    rnd = random.Random()
    batch = new_batch(rnd, rnd.choice(GROUPS), head_dim, rnd.choice([16, 32]), dtype)
    params = fp8_params(rnd, batch)
    check_fp8(batch, flat_equals_z(batch, None, params), params)


@pytest.mark.parametrize("window", [1, 37, 256])
def test_sliding_window(window: int) -> None:
    rnd = random.Random()
    batch = new_batch(rnd, rnd.choice(GROUPS), 128, 16, torch.bfloat16)
    params = AttentionParams(batch.scale, window)
    check(batch, flat_equals_z(batch, None, params), window)


@pytest.mark.parametrize("config", OTHERS, ids=lambda c: c.name)
def test_other_configs(config: v2.V2Config) -> None:
    rnd = random.Random()
    batch = new_batch(rnd, rnd.choice(GROUPS), rnd.choice([64, 128]), 16, rnd.choice(DTYPES))
    check(batch, flat_equals_z(batch, config))


def test_prefill_only_and_lone_decode_rows() -> None:
    # one long prompt (the map is its 64 tiles), and a step that is all padding but one row
    for reqs in ([(2048, 2048)], [(0, 0), (2, 900), (0, 0)], [(1, 5), (3, 3)]):
        batch = StepBatch(
            reqs, num_kv_heads=2, group=4, head_dim=128, block_size=16, dtype=torch.bfloat16
        )
        check(batch, flat_equals_z(batch))


def test_greedy_generation_with_the_flat_grid_equals_the_default(
    tmp_path: Path, stories_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked prompts beside decoding requests (mixed eager steps) on a tiny GQA model:
    the flat grid runs in those steps and changes no token or logprob."""
    pytest.importorskip("transformers")
    from tests.gpu.helpers import MIXED_STEP_ARGS, generate, mixed_step_prompts
    from tests.test_golden import check_logprobs_close
    from tests.tiny_models import tiny_gqa_model

    path = tiny_gqa_model(tmp_path, stories_path)
    prompts = mixed_step_prompts(5)
    args = dict(
        device="cuda",
        dtype="bfloat16",
        enforce_eager=True,  # no capture time: graphs carry no map (CPU tests check it)
        **MIXED_STEP_ARGS,
    )
    monkeypatch.setenv(pt.ENV, "z")
    default = generate(path, prompts, max_tokens=24, **args)
    used: list[int] = []
    real = v2.flat_tiles

    def counted(md: AttentionMetadata, config: v2.V2Config, group: int) -> torch.Tensor | None:
        tiles = real(md, config, group)
        if tiles is not None:
            used.append(tiles.shape[0])
        return tiles

    monkeypatch.setattr(v2, "flat_tiles", counted)
    monkeypatch.setenv(pt.ENV, "flat")
    flat = generate(path, prompts, max_tokens=24, **args)
    assert used, "no step ran the flat grid"
    # the same per-tile math: the same tokens, logprobs within run-to-run noise
    assert [t for t, _ in flat.out] == [t for t, _ in default.out]
    check_logprobs_close(flat.out, default.out, "flat-grid", atol=1e-3)
