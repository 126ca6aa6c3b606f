"""Round 2 of the tensor-core decode kernel (cuda/decode_attention.cu) on the GPU: every
compiled variant (HEADRACE_DECODE_CONFIG), the fused merge against the merge kernel, `auto`
on 16-bit caches, and batch 1 at short contexts in a CUDA graph captured with a long bound.

Same conventions as tests/gpu/test_gpu_decode_attention.py (whose helpers these use): fresh
random shapes, shuffled pages, NaN in free pages and past each request's end, outputs
poisoned with NaN, the torch reference and FlashAttention's accuracy bar.
"""

from __future__ import annotations

import random

import pytest
import torch

from cuda import decode_attention as da
from cuda.kv_write import quantize_kv
from cuda.paged_attention import (
    AttentionMetadata,
    AttentionParams,
    paged_attention,
    paged_attention_ref,
)
from cuda.paged_attention_kernels import decode_workspace
from tests.gpu.helpers import new_decode_kernel  # noqa: F401 (the fixture, by name)
from tests.gpu.test_gpu_decode_attention import Expect, _batch, _force_splits, _rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.usefixtures("new_decode_kernel"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GROUPS = [1, 3, 5, 6, 7]  # GQA ratios, mostly not powers of two


def _counters_zero() -> bool:
    return all(not bool(t.any()) for t in da._counters.values())


@pytest.mark.parametrize("config", da.CONFIGS)
@pytest.mark.parametrize(
    ("dtype", "head_dim", "block_size"),
    [(torch.bfloat16, 128, 16), (torch.float16, 64, 32), (torch.bfloat16, 64, 16)],
)
def test_variants_match_reference(
    monkeypatch: pytest.MonkeyPatch,
    config: str,
    dtype: torch.dtype,
    head_dim: int,
    block_size: int,
) -> None:
    random.seed(hash((config, dtype, head_dim, block_size)) & 0xFFFF)
    torch.manual_seed(random.randint(0, 1 << 30))
    monkeypatch.setenv(da.CONFIG_ENV, config)
    b = _batch(random.choice(GROUPS), head_dim, block_size, dtype)
    expect = Expect(b)
    expect.check(b.run(), f"{config} planned")
    expect.check(b.run(max_seq_len=131072), f"{config} graph bound")
    for splits in (1, 6, 64):
        with monkeypatch.context() as m:
            _force_splits(m, splits)
            expect.check(b.run(), f"{config} {splits} splits")
    assert _counters_zero()


@pytest.mark.parametrize("config", [None, "w2s3", "w4s2"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_variants_fp8_kv(
    monkeypatch: pytest.MonkeyPatch, config: str | None, head_dim: int
) -> None:
    random.seed(hash(("fp8-2", config, head_dim)) & 0xFFFF)
    torch.manual_seed(random.randint(0, 1 << 30))
    if config:
        monkeypatch.setenv(da.CONFIG_ENV, config)
    dtype = random.choice([torch.bfloat16, torch.float16])
    b = _batch(random.choice(GROUPS), head_dim, random.choice([16, 32]), dtype)
    k_scale, v_scale = 0.5, 0.25
    b.kv_cache = torch.stack(
        [quantize_kv(b.kv_cache[0], k_scale), quantize_kv(b.kv_cache[1], v_scale)]
    )
    params = AttentionParams(b.scale, k_scale=k_scale, v_scale=v_scale)
    want = paged_attention_ref(b.q.float(), b.kv_cache, b.metadata(), params)
    rows = _rows(b)
    for splits in (None, 1, 9):
        with monkeypatch.context() as m:
            _force_splits(m, splits)
            got = b.run(k_scale=k_scale, v_scale=v_scale)[rows].float()
        assert bool(torch.isfinite(got).all()), splits
        torch.testing.assert_close(got, want[rows], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_merge_equals_merge_kernel(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, window: int | None
) -> None:
    torch.manual_seed(21)
    random.seed(21)
    b = _batch(4, 128, 16, dtype, num_kv_heads=8)
    expect = Expect(b, window)
    fused = b.run(max_seq_len=65536, sliding_window=window)
    assert _counters_zero()
    monkeypatch.setenv(da.FUSED_MERGE_ENV, "0")
    unfused = b.run(max_seq_len=65536, sliding_window=window)
    rows = _rows(b)
    expect.check(fused, "fused")
    expect.check(unfused, "merge kernel")
    assert (fused[rows].float() - unfused[rows].float()).abs().max().item() < 1e-2


def test_auto_runs_the_new_kernel_on_16bit_kv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(da.ENV, "auto")
    calls: list[bool] = []
    real = da.launch_decode

    def spy(*args: object, **kw: object) -> None:
        calls.append(True)
        real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(da, "launch_decode", spy)
    b = _batch(4, 128, 16, torch.bfloat16, num_kv_heads=2)
    Expect(b).check(b.run(), "auto")
    assert bool(calls) == da.AUTO_16BIT


@pytest.mark.parametrize("config", [None, "w4s3", "w2s3"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp8_half_math_matches_reference(
    monkeypatch: pytest.MonkeyPatch, config: str | None, head_dim: int
) -> None:
    """HEADRACE_DECODE_FP8_MATH=f16 (decode_tc_fp8h): FP8 KV with fp16 mma, bf16 and fp16
    models, planned and forced split counts; close to the reference and to decode_tc_fp8."""
    random.seed(hash(("fp8h", config, head_dim)) & 0xFFFF)
    torch.manual_seed(random.randint(0, 1 << 30))
    if config:
        monkeypatch.setenv(da.CONFIG_ENV, config)
    for dtype in (torch.bfloat16, torch.float16):
        b = _batch(random.choice(GROUPS), head_dim, random.choice([16, 32]), dtype)
        k_scale, v_scale = 0.5, 0.25
        b.kv_cache = torch.stack(
            [quantize_kv(b.kv_cache[0], k_scale), quantize_kv(b.kv_cache[1], v_scale)]
        )
        params = AttentionParams(b.scale, k_scale=k_scale, v_scale=v_scale)
        want = paged_attention_ref(b.q.float(), b.kv_cache, b.metadata(), params)
        rows = _rows(b)
        for splits in (None, 1, 9):
            with monkeypatch.context() as m:
                _force_splits(m, splits)
                m.delenv(da.FP8_MATH_ENV, raising=False)
                widened = b.run(k_scale=k_scale, v_scale=v_scale)[rows].float()
                m.setenv(da.FP8_MATH_ENV, "f16")
                got = b.run(k_scale=k_scale, v_scale=v_scale)[rows].float()
            assert bool(torch.isfinite(got).all()), (dtype, splits)
            torch.testing.assert_close(got, want[rows], atol=2e-2, rtol=2e-2)
            assert (got - widened).abs().max().item() < 2e-2, (dtype, splits)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("batch_kind", ["small", "large"])
def test_plan_v3_matches_reference(
    monkeypatch: pytest.MonkeyPatch, fp8: bool, batch_kind: str
) -> None:
    """HEADRACE_DECODE_PLAN=v3: the variant by grid size and the longer splits, at a small
    batch (the splitting variant) and one of 64 requests x 8 KV heads (the filling one),
    planned and at a graph's 128k bound."""
    monkeypatch.setenv(da.PLAN_ENV, "v3")
    random.seed(hash(("v3", fp8, batch_kind)) & 0xFFFF)
    torch.manual_seed(random.randint(0, 1 << 30))
    dtype = random.choice([torch.bfloat16, torch.float16])
    kw: dict = {"num_kv_heads": 8}
    if batch_kind == "large":
        kw["reqs"] = [(1, random.randint(1, 700)) for _ in range(62)] + [(0, 0), (1, 1)]
    b = _batch(
        random.choice(GROUPS), random.choice([64, 128]), random.choice([16, 32]), dtype, **kw
    )
    rows = _rows(b)
    if not fp8:
        expect = Expect(b)
        expect.check(b.run(), "v3 planned")
        expect.check(b.run(max_seq_len=131072), "v3 graph bound")
        for splits in (9, 64):  # v3's merge (HR_DECODE_MERGE3) over many partials
            with monkeypatch.context() as m:
                _force_splits(m, splits)
                expect.check(b.run(), f"v3 {splits} splits")
        assert _counters_zero()
        return
    k_scale, v_scale = 0.5, 0.25
    b.kv_cache = torch.stack(
        [quantize_kv(b.kv_cache[0], k_scale), quantize_kv(b.kv_cache[1], v_scale)]
    )
    params = AttentionParams(b.scale, k_scale=k_scale, v_scale=v_scale)
    want = paged_attention_ref(b.q.float(), b.kv_cache, b.metadata(), params)[rows]
    for bound in (None, 131072):
        got = b.run(k_scale=k_scale, v_scale=v_scale, max_seq_len=bound)[rows].float()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert _counters_zero()


@pytest.mark.parametrize(
    ("fp8", "env"),
    [
        (False, {}),
        (True, {}),
        (False, {da.PLAN_ENV: "v3"}),
        (True, {da.PLAN_ENV: "v3"}),
        (True, {da.PLAN_ENV: "v3", da.FP8_MATH_ENV: "f16"}),
    ],
)
def test_batch1_short_contexts_in_a_graph(
    monkeypatch: pytest.MonkeyPatch, fp8: bool, env: dict[str, str]
) -> None:
    """W1's shape: batch 1, Llama-3-8B heads, a graph captured at length 1 with a 128k bound,
    replayed at 1 .. 5000 tokens (one split up to 128 tokens, v3: 384 / 512, the fused merge
    past it): bitwise equal to eager at the same bound, close to the reference, counters
    left zero."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    torch.manual_seed(8)
    dtype, hkv, group, d, bs, max_len, bound = torch.bfloat16, 8, 4, 128, 16, 5008, 131072
    dev = torch.device("cuda")
    nblk = max_len // bs
    cache = torch.randn(2, nblk + 1, bs, hkv, d, dtype=dtype, device=dev)
    k_scale, v_scale = (0.5, 0.25) if fp8 else (1.0, 1.0)
    if fp8:
        cache = torch.stack([quantize_kv(cache[0], k_scale), quantize_kv(cache[1], v_scale)])
    tables = torch.randperm(nblk, device=dev).to(torch.int32).view(1, nblk)
    q = torch.randn(1, hkv * group, d, dtype=dtype, device=dev)
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    seq_lens = torch.ones(1, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    kv_dtype = cache.dtype if fp8 else None
    workspace = decode_workspace(dtype, d, 1, hkv * group, hkv, bound, dev, kv_dtype)
    slots = torch.empty(0, dtype=torch.int64, device=dev)
    md = AttentionMetadata(qsl, seq_lens, tables, slots, max_query_len=1, max_seq_len=bound)
    params = AttentionParams(d**-0.5, k_scale=k_scale, v_scale=v_scale)

    def step() -> None:
        paged_attention(q, cache, md, params, out, workspace)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile, allocate the merge counters outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for n in (1, 15, 16, 17, 100, 128, 129, 255, 256, 257, 384, 385, 512, 513, 1000, 5000, 128):
        seq_lens.fill_(n)
        q.normal_()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        out.fill_(float("nan"))
        step()
        torch.cuda.synchronize()
        assert torch.equal(replayed, out), n
        ref = paged_attention_ref(q.float(), cache, md, params)
        assert (out.float() - ref).abs().max().item() < 3e-2, n
        assert _counters_zero(), n
