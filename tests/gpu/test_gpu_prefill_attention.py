"""The sm_90 prefill attention kernel (cuda/prefill_attention.py) against the torch reference.

Every case draws fresh random shapes and inputs: whole prompts and chunked-prefill chunks
(queries at an offset into the sequence) of lengths that are not multiples of the tiles or
pages, zero-length padding entries, in one mixed batch; physical pages shuffled; free pages
and unused page tails NaN; outputs poisoned with NaN. Accuracy bar (FlashAttention's):
error against an fp32 reference at most twice a plain low-precision torch computation's.
"""

from __future__ import annotations

import random

import pytest
import torch

from cuda import prefill_attention as pa
from cuda.kv_write import quantize_kv
from cuda.paged_attention import AttentionParams, paged_attention_ref
from tests.gpu.test_gpu_kernels import CONTEXTS, Batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16]
GROUPS = [1, 3, 4, 7]
DEFAULT = pa.DEFAULT_CONFIG[128]
OTHERS = [c for c in pa.CONFIGS if c != DEFAULT]
V2 = [c for c in pa.CONFIGS if c.v2]


def mixed_reqs(rnd: random.Random) -> list[tuple[int, int]]:
    """(q_len, seq_len) pairs: whole prompts, chunks after cached tokens, padding."""
    reqs: list[tuple[int, int]] = [(0, 0)]
    for s in CONTEXTS:
        if s <= 700:
            reqs.append((s, s))
        reqs.append((min(s, rnd.choice([2, 7, 64, 129, 300, rnd.randint(1, 200)])), s))
    for _ in range(3):
        s = rnd.randint(2, 1500)
        reqs.append((rnd.randint(1, s), s))
    reqs.append((0, 0))
    rnd.shuffle(reqs)
    return reqs


def new_batch(
    rnd: random.Random, group: int, head_dim: int, block_size: int, dtype: torch.dtype, **kw
) -> Batch:
    reqs = kw.pop("reqs", None) or mixed_reqs(rnd)
    return Batch(
        reqs,
        num_kv_heads=kw.pop("num_kv_heads", 2),
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )


def run_new(
    batch: Batch, config: pa.TileConfig | None = None, window: int | None = None
) -> torch.Tensor:
    out = torch.full_like(batch.q, float("nan"))
    assert pa.unsupported_reason(batch.q, batch.kv_cache, batch.metadata()) is None
    params = AttentionParams(batch.scale, window)
    pa.prefill_attention_cuda(batch.q, batch.kv_cache, batch.metadata(), params, out, config)
    torch.cuda.synchronize()
    return out


def check(batch: Batch, out: torch.Tensor, window: int | None = None) -> None:
    assert torch.isfinite(out).all(), f"unwritten or NaN output elements; reqs {batch.reqs}"
    ref = batch.reference(sliding_window=window)
    err = (out.float() - ref).abs().max().item()
    base = (batch.lowp(window).float() - ref).abs().max().item()
    assert err <= 2 * base + 2e-3, f"error {err:.3g} vs low-precision {base:.3g}; {batch.reqs}"


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_default_config(dtype: torch.dtype, head_dim: int, group: int, block_size: int) -> None:
    rnd = random.Random()
    batch = new_batch(rnd, group, head_dim, block_size, dtype)
    check(batch, run_new(batch))


@pytest.mark.parametrize("group", [4, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("config", OTHERS, ids=lambda c: c.name)
def test_other_configs(config: pa.TileConfig, head_dim: int, group: int) -> None:
    rnd = random.Random()
    dtype = rnd.choice(DTYPES)
    batch = new_batch(rnd, group, head_dim, rnd.choice([16, 32]), dtype)
    check(batch, run_new(batch, config))


@pytest.mark.parametrize("window", [1, 37, 256])
@pytest.mark.parametrize("config", pa.CONFIGS, ids=lambda c: c.name)
def test_sliding_window(config: pa.TileConfig, window: int) -> None:
    rnd = random.Random()
    batch = new_batch(rnd, rnd.choice(GROUPS), 128, 16, torch.bfloat16)
    check(batch, run_new(batch, config, window), window)


def test_long_prompts_llama3_heads() -> None:
    # Llama-3-8B heads (32 q, 8 KV, head_dim 128): a whole 2k-ish prompt and a long chunk.
    rnd = random.Random()
    reqs = [(rnd.randint(1900, 2100), 0), (rnd.randint(300, 700), rnd.randint(3000, 4000))]
    reqs = [(q, max(q, s)) for q, s in reqs]
    batch = new_batch(rnd, 4, 128, 16, torch.bfloat16, reqs=reqs, num_kv_heads=8)
    check(batch, run_new(batch))


def test_strided_q_and_out() -> None:
    # q and out as column slices of a fused [T, (Hq + 2 Hkv) x D] projection.
    rnd = random.Random()
    batch = new_batch(rnd, 4, 128, 16, torch.bfloat16)
    t, hq, d = batch.q.shape
    fused = torch.randn(t, hq * d + 2 * 2 * d, dtype=batch.q.dtype, device="cuda")
    q = fused[:, : hq * d].view(t, hq, d)
    q.copy_(batch.q)
    out_buf = torch.full_like(fused, float("nan"))
    out = out_buf[:, : hq * d].view(t, hq, d)
    pa.prefill_attention_cuda(
        q, batch.kv_cache, batch.metadata(), AttentionParams(batch.scale), out
    )
    torch.cuda.synchronize()
    check(batch, out)
    assert out_buf[:, hq * d :].isnan().all(), "wrote outside out"


@pytest.mark.parametrize("choice", ["new", "old"])
def test_dispatch_old_and_new_agree(choice: str) -> None:
    rnd = random.Random()
    batch = new_batch(rnd, 3, 64, 32, torch.float16)
    out = torch.full_like(batch.q, float("nan"))
    pa.attention_cuda(
        batch.q, batch.kv_cache, batch.metadata(), AttentionParams(batch.scale), out, None, choice
    )
    torch.cuda.synchronize()
    check(batch, out)


def test_cuda_graph_replay_at_other_lengths() -> None:
    # The grid comes from max_query_len alone: a graph captured at one set of lengths is
    # right after seq_lens and query_start_loc change under the same bound.
    rnd = random.Random()
    reqs = [(64, 64), (37, 500), (1, 20), (0, 0)]
    batch = new_batch(rnd, 4, 128, 16, torch.bfloat16, reqs=reqs)
    out = torch.full_like(batch.q, float("nan"))
    md, params = batch.metadata(), AttentionParams(batch.scale)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pa.prefill_attention_cuda(batch.q, batch.kv_cache, md, params, out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pa.prefill_attention_cuda(batch.q, batch.kv_cache, md, params, out)
    # Same token count and q_len bound, other lengths inside each request's pages.
    batch.reqs = [(30, 40), (64, 500), (8, 20), (0, 0)]
    new_qsl = torch.tensor([0, 30, 94, 102, 102], dtype=torch.int32, device="cuda")
    new_lens = torch.tensor([40, 500, 20, 0], dtype=torch.int32, device="cuda")
    batch.query_start_loc.copy_(new_qsl)
    batch.seq_lens.copy_(new_lens)
    batch.max_query_len = 64
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(batch, out)


def scale_keys_per_page(batch: Batch, rnd: random.Random, climb: bool) -> None:
    """Multiplies each request's K pages by a factor: climbing along the sequence (scores
    whose max keeps moving up by small steps and, at the steep end, by more than
    RESCALE_LOG2 per tile) or random in [0.05, 6] (jumps up and down)."""
    bs = batch.kv_cache.shape[2]
    for r, (_, seq_len) in enumerate(batch.reqs):
        for b in range((seq_len + bs - 1) // bs):
            f = 0.2 + 0.02 * b if climb else rnd.uniform(0.05, 6.0)
            batch.kv_cache[0, int(batch.block_tables[r, b])] *= f


@pytest.mark.parametrize("climb", [True, False], ids=["climbing", "jumping"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", [*V2, pa.ROUND1_CONFIG], ids=lambda c: c.name)
def test_moving_maxima(config: pa.TileConfig, dtype: torch.dtype, climb: bool) -> None:
    # v2's lazy rescaling: rows whose running max moves often and far (and not at all).
    rnd = random.Random()
    reqs = [(rnd.randint(200, 900), rnd.randint(900, 2500)) for _ in range(3)]
    reqs += [(s, s) for s in (rnd.randint(500, 1500), 77)]
    batch = new_batch(rnd, rnd.choice([3, 4]), rnd.choice([64, 128]), 16, dtype, reqs=reqs)
    scale_keys_per_page(batch, rnd, climb)
    check(batch, run_new(batch, config))


def test_v2_and_round_1_agree() -> None:
    rnd = random.Random()
    batch = new_batch(rnd, 4, 128, 16, torch.bfloat16)
    r1 = run_new(batch, pa.ROUND1_CONFIG)
    check(batch, r1)
    for config in V2:
        out = run_new(batch, config)
        check(batch, out)
        # the same math but for the rounding of P (v2's is unnormalized, up to 2^8)
        assert (out.float() - r1.float()).abs().mean().item() < 1e-2, config.name


def test_long_prompt_runs_the_long_tile() -> None:
    # Past LONG_ROWS rows `new` switches to 128-key tiles: a 4k-token prompt and a chunk.
    rnd = random.Random()
    q_len = pa.LONG_ROWS // 4 + rnd.randint(0, 300)
    reqs = [(q_len, q_len), (rnd.randint(100, 900), rnd.randint(1000, 3000))]
    batch = new_batch(rnd, 4, 128, 16, torch.bfloat16, reqs=reqs, num_kv_heads=8)
    md = batch.metadata()
    assert pa.default_config(128, md.max_query_len, 4) == pa.LONG_CONFIG[128]
    out = torch.full_like(batch.q, float("nan"))
    pa.attention_cuda(batch.q, batch.kv_cache, md, AttentionParams(batch.scale), out)
    torch.cuda.synchronize()
    check(batch, out)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_fp8_kv_prefill_takes_the_old_kernel(dtype: torch.dtype, block_size: int) -> None:
    # The tile kernel takes 16-bit caches only; `new` sends FP8 ones to the older kernel.
    rnd = random.Random()
    batch = new_batch(rnd, rnd.choice(GROUPS), rnd.choice([64, 128]), block_size, dtype)
    k_scale, v_scale = 0.5, 0.25
    cache16 = batch.kv_cache
    batch.kv_cache = torch.stack(
        [quantize_kv(cache16[0], k_scale), quantize_kv(cache16[1], v_scale)]
    )
    md = batch.metadata()
    assert "dtype" in str(pa.unsupported_reason(batch.q, batch.kv_cache, md))
    params = AttentionParams(batch.scale, k_scale=k_scale, v_scale=v_scale)
    out = torch.full_like(batch.q, float("nan"))
    pa.attention_cuda(batch.q, batch.kv_cache, md, params, out)
    torch.cuda.synchronize()
    want = paged_attention_ref(batch.q.float(), batch.kv_cache, md, params)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
