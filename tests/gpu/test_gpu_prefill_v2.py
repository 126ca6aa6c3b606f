"""The prefill kernel, round 2 (cuda/prefill_v2.py), called directly, against the torch
reference, 16-bit and FP8 KV (the engine's route to it: tests/gpu/test_gpu_prefill_attention.py,
which also holds the helpers).

Fresh random shapes every run (whole prompts, chunks after cached tokens, lengths that are
not multiples of the tiles or pages, zero-length padding entries) in one mixed batch,
shuffled pages, NaN in free pages and page tails, outputs poisoned with NaN; the default
configuration at GQA groups 1 / 3 / 4 / 5 / 7 (powers of two and not), head_dim 64 and 128,
block sizes 16 and 32, bf16 and fp16; every configuration under sliding windows. FP8 caches
(float8_e4m3fn, K / k_scale and V / v_scale) are checked against paged_attention_ref run on
the CPU over the same FP8 bytes; the accuracy bar is FlashAttention's (error against fp32 at
most twice a plain low-precision torch computation's, here on the dequantized cache), and the
older kernel (HEADRACE_PREFILL_FP8=old) is held to it too.
"""

from __future__ import annotations

import random

import pytest
import torch

from cuda import prefill_v2 as v2
from cuda.paged_attention import AttentionParams
from cuda.paged_attention_kernels import paged_attention_cuda
from tests.gpu.test_gpu_kernels import Batch
from tests.gpu.test_gpu_prefill_attention import check, check_fp8, fp8_params, new_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16]
GROUPS = [1, 3, 4, 5, 7]
OTHERS = [c for c in v2.CONFIGS if c != v2.DEFAULT_CONFIG]


def run_v2(
    batch: Batch, config: v2.V2Config | None = None, params: AttentionParams | None = None
) -> torch.Tensor:
    out = torch.full_like(batch.q, float("nan"))
    md = batch.metadata()
    assert v2.unsupported_reason(batch.q, batch.kv_cache, md) is None
    v2.prefill_v2_cuda(
        batch.q, batch.kv_cache, md, params or AttentionParams(batch.scale), out, config
    )
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_default_config(dtype: torch.dtype, head_dim: int, group: int, block_size: int) -> None:
    batch = new_batch(random.Random(), group, head_dim, block_size, dtype)
    check(batch, run_v2(batch))


@pytest.mark.parametrize("group", [4, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("config", OTHERS, ids=lambda c: c.name)
def test_other_configs(config: v2.V2Config, head_dim: int, group: int) -> None:
    rnd = random.Random()
    batch = new_batch(rnd, group, head_dim, rnd.choice([16, 32]), rnd.choice(DTYPES))
    check(batch, run_v2(batch, config))


@pytest.mark.parametrize("window", [1, 37, 256])
@pytest.mark.parametrize("config", v2.CONFIGS, ids=lambda c: c.name)
def test_sliding_window(config: v2.V2Config, window: int) -> None:
    rnd = random.Random()
    batch = new_batch(rnd, rnd.choice(GROUPS), 128, 16, torch.bfloat16)
    check(batch, run_v2(batch, config, AttentionParams(batch.scale, window)), window)


def test_key_norms_that_jump_exercise_the_lazy_rescale() -> None:
    # K scaled page by page by factors from 0.37 to 3.3 (pages are shuffled, so along a
    # sequence the norms jump up and down at random): rows' maxima rise by more and by less
    # than the threshold, inside a tile and from tile to tile.
    batch = new_batch(
        random.Random(), 4, 128, 16, torch.bfloat16, reqs=[(700, 700), (300, 2000), (0, 0)]
    )
    factor = torch.empty(batch.kv_cache.shape[1], device="cuda").uniform_(-1.0, 1.2).exp()
    batch.kv_cache[0] *= factor[:, None, None, None].to(batch.kv_cache.dtype)
    check(batch, run_v2(batch))


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [3, 5])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_fp8_default_config(dtype: torch.dtype, head_dim: int, group: int, block_size: int) -> None:
    rnd = random.Random()
    batch = new_batch(rnd, group, head_dim, block_size, dtype)
    params = fp8_params(rnd, batch)
    check_fp8(batch, run_v2(batch, None, params), params)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("config", OTHERS, ids=lambda c: c.name)
def test_fp8_other_configs(config: v2.V2Config, head_dim: int) -> None:
    rnd = random.Random()
    batch = new_batch(rnd, rnd.choice(GROUPS), head_dim, rnd.choice([16, 32]), rnd.choice(DTYPES))
    params = fp8_params(rnd, batch, rnd.choice([None, 100]))
    check_fp8(batch, run_v2(batch, config, params), params)


def test_fp8_old_and_new_meet_the_same_bar() -> None:
    # Llama-3-8B heads, a long prompt and a chunk after a cached prefix: the older kernel
    # (HEADRACE_PREFILL_FP8=old) and round 2 against the same CPU reference.
    rnd = random.Random()
    reqs = [(rnd.randint(1500, 2100), 0), (rnd.randint(300, 700), rnd.randint(3000, 4000))]
    reqs = [(q, max(q, s)) for q, s in reqs]
    batch = new_batch(rnd, 4, 128, 16, torch.bfloat16, reqs=reqs, num_kv_heads=8)
    params = fp8_params(rnd, batch)
    old = torch.full_like(batch.q, float("nan"))
    paged_attention_cuda(batch.q, batch.kv_cache, batch.metadata(), params, old)
    torch.cuda.synchronize()
    check_fp8(batch, old, params)
    check_fp8(batch, run_v2(batch, None, params), params)


@pytest.mark.parametrize("fp8", [False, True], ids=["kv16", "fp8"])
def test_cuda_graph_replay_at_other_lengths(fp8: bool) -> None:
    # The grid comes from max_query_len alone: a replay after seq_lens and query_start_loc
    # change under the same bound equals eager.
    rnd = random.Random()
    batch = new_batch(rnd, 5, 128, 16, torch.bfloat16, reqs=[(64, 64), (37, 500), (1, 20), (0, 0)])
    params = fp8_params(rnd, batch) if fp8 else AttentionParams(batch.scale)
    out = torch.full_like(batch.q, float("nan"))
    md = batch.metadata()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        v2.prefill_v2_cuda(batch.q, batch.kv_cache, md, params, out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v2.prefill_v2_cuda(batch.q, batch.kv_cache, md, params, out)
    batch.reqs = [(30, 40), (64, 500), (8, 20), (0, 0)]
    batch.query_start_loc.copy_(torch.tensor([0, 30, 94, 102, 102], dtype=torch.int32))
    batch.seq_lens.copy_(torch.tensor([40, 500, 20, 0], dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    eager = run_v2(batch, None, params)
    assert torch.equal(out, eager), "graph replay differs from eager"
    if fp8:
        check_fp8(batch, out, params)
    else:
        check(batch, out)


def test_strided_q_and_out() -> None:
    # q and out as column slices of a fused [T, (Hq + 2 Hkv) x D] projection.
    batch = new_batch(random.Random(), 3, 128, 16, torch.bfloat16)
    t, hq, d = batch.q.shape
    fused = torch.randn(t, hq * d + 2 * 2 * d, dtype=batch.q.dtype, device="cuda")
    q = fused[:, : hq * d].view(t, hq, d)
    q.copy_(batch.q)
    out_buf = torch.full_like(fused, float("nan"))
    out = out_buf[:, : hq * d].view(t, hq, d)
    v2.prefill_v2_cuda(q, batch.kv_cache, batch.metadata(), AttentionParams(batch.scale), out)
    torch.cuda.synchronize()
    check(batch, out)
    assert out_buf[:, hq * d :].isnan().all(), "wrote outside out"
