"""The batch-1 decode step's kernels on the GPU (issue 11): the small-M GEMV against torch,
rotary + KV write in one launch against its reference, greedy decode graphs against eager
steps, and greedy generation on the GPU against the CPU path.

Outputs come from torch's caching allocator after blocks of the same size were filled with
NaN and freed, so an element a kernel does not write shows up as NaN. References are
patched to raise during kernel calls, so a silent fallback fails instead of passing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from cuda import gemv, kv_write_rotary
from cuda.fused_ops import rotary_ref
from cuda.kv_write import write_kv_ref
from ipc.messages import SamplingParams
from tests.test_golden import check_logprobs_close, prompts_of_different_lengths
from tests.tiny_models import tiny_model_hd64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = "cuda"
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _poison(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEV) for _ in range(2)]
    del blocks


@pytest.fixture
def no_gemv_fallback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def boom(*args: object) -> None:
        raise AssertionError("the GEMV fell back to the torch reference")

    monkeypatch.setattr(gemv, "gemv_ref", boom)
    yield


# (N, K): the 8B model's q/k/v and o, and sizes that are not multiples of the block's
# 4 (or 2) rows or of its 256 x 8-element chunk sweep.
GEMV_SHAPES = [(6144, 4096), (4096, 4096), (1003, 4104), (37, 72), (4097, 8), (130, 14336)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), GEMV_SHAPES)
def test_gemv_matches_torch(dtype: torch.dtype, n: int, k: int, no_gemv_fallback: None) -> None:
    rng = random.Random(n * 7919 + k)
    m = rng.randint(1, 8)
    x = torch.randn(m, k, device=DEV).to(dtype)
    w = (torch.randn(n, k, device=DEV) * 0.05).to(dtype)
    bias = torch.randn(n, device=DEV).to(dtype) if rng.random() < 0.5 else None
    assert gemv.gemv_supported(x, w, bias)
    _poison((m, n), dtype)
    got = gemv.gemv(x, w, bias)
    assert not got.isnan().any(), "unwritten (NaN) outputs"
    want = (x.double() @ w.double().t() + (0 if bias is None else bias.double())).to(dtype)
    scale = (x.double().abs() @ w.double().abs().t()).to(torch.float32)  # bounds the sum error
    err = (got.float() - want.float()).abs()
    assert (err <= ULP[dtype] * want.float().abs() + 1e-5 * scale + 1e-6).all(), err.max()
    # cuBLAS rounds its own sums too: both within a few ulps of the largest output (H200:
    # 0.0195 apart at K = 14336 in bf16, one ulp of a value near 4).
    bound = 4 * ULP[dtype] * float(want.float().abs().max())
    torch.testing.assert_close(got, F.linear(x, w, bias), rtol=4 * ULP[dtype], atol=bound)
    # A row's result does not depend on the batch it is in (same sum order for every M).
    assert torch.equal(gemv.gemv(x[:1].contiguous(), w, bias)[0], got[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_rule_on_gpu(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(3, 4096, device=DEV).to(dtype)
    w = torch.randn(4096, 4096, device=DEV).to(dtype) * 0.02
    calls: list[int] = []
    real = gemv.gemv

    def counted(*a: Any) -> torch.Tensor:
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(gemv, "gemv", counted)
    monkeypatch.setenv("HEADRACE_GEMV", "cublas")
    a = gemv.linear(x, w, None)
    monkeypatch.setenv("HEADRACE_GEMV", "old")  # round 1 (round 2: test_gpu_gemv_step.py)
    b = gemv.linear(x, w, None)
    assert calls == [1]
    torch.testing.assert_close(a, b, rtol=4 * ULP[dtype], atol=1e-2)


def _rotary_case(
    dtype: torch.dtype, hq: int, hkv: int, d: int, rot: int, block: int, t: int
) -> dict[str, Any]:
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEV).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    max_pos = 600
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=DEV).float() / rot))
    freqs = torch.outer(torch.arange(max_pos, device=DEV).float(), inv)
    num_blocks = -(-t // block) + 3
    slots = torch.randperm(num_blocks * block, device=DEV)[:t]
    slots[torch.rand(t, device=DEV) < 0.2] = -1  # padding rows: not written
    return {
        "positions": torch.randint(0, max_pos, (t,), device=DEV),
        "q": q.view(t, hq, d),
        "k": k.view(t, hkv, d),
        "v": v.view(t, hkv, d),
        "kv_cache": torch.full((2, num_blocks, block, hkv, d), float("nan"), device=DEV).to(dtype),
        "slot_mapping": slots,
        "cos_sin": torch.cat([freqs.cos(), freqs.sin()], dim=-1),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("hq", "hkv", "d", "rot"), [(12, 4, 128, 128), (10, 2, 64, 64), (6, 6, 64, 32), (7, 1, 128, 64)]
)
@pytest.mark.parametrize("block", [16, 32])
def test_rotary_kv_write_matches_reference(
    dtype: torch.dtype, hq: int, hkv: int, d: int, rot: int, block: int, monkeypatch: Any
) -> None:
    t = random.Random(hq * d + block).randint(1, 70)
    torch.manual_seed(t)
    got = _rotary_case(dtype, hq, hkv, d, rot, block, t)
    want = {key: v.clone() for key, v in got.items()}
    assert kv_write_rotary.fused_supported(**got)

    def boom(*args: object) -> None:
        raise AssertionError("rotary + KV write fell back to two launches")

    monkeypatch.setattr(kv_write_rotary, "rotary", boom)
    monkeypatch.setattr(kv_write_rotary, "write_kv", boom)
    kv_write_rotary.rotary_write_kv(**got)
    rotary_ref(want["positions"], want["q"], want["k"], want["cos_sin"])
    write_kv_ref(want["k"], want["v"], want["kv_cache"], want["slot_mapping"])
    for key in ("q", "k", "v"):
        assert torch.equal(got[key], want[key]), key
    # NaN where nothing was written on both sides; every written slot bit-equal.
    torch.testing.assert_close(got["kv_cache"], want["kv_cache"], rtol=0, atol=0, equal_nan=True)


def _greedy_generate(path: Any, prompts: list[list[int]], **engine_args: Any) -> tuple:
    from headrace.llm import LLM

    if engine_args.get("device") == "cuda":
        engine_args.setdefault("kv_cache_memory_gb", 2.0)
    llm = LLM(str(path), **engine_args)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    g = llm.engine.runner.graph_runner
    greedy = g.greedy_replays if g is not None else 0
    llm.close()
    return outs, greedy


@pytest.mark.parametrize("batch", [1, 8])  # bucket sizes: the LM head sees M = batch
def test_greedy_graph_equals_sampler_path(batch: int, tmp_path: Any, stories_path: Any) -> None:
    """Greedy graphs vs the plain graphs + compute_logits + sampler (logprobs asked, so the
    greedy graphs are not used): the same captured kernels, so the same tokens exactly."""
    from tests.gpu.helpers import generate

    path = tiny_model_hd64(tmp_path, stories_path)
    prompts = prompts_of_different_lengths()[:batch]
    args = dict(device="cuda", dtype="bfloat16", block_size=16, max_num_seqs=16, max_model_len=256)
    sampled = generate(path, prompts, max_tokens=40, **args)
    assert sampled.replays[1] > 0
    want = [t for t, _ in sampled.out]
    graphed, greedy = _greedy_generate(path, prompts, **args)
    assert greedy >= 30, "decode steps should replay the greedy graphs"
    assert graphed == want
    chained, greedy = _greedy_generate(path, prompts, async_scheduling=True, **args)
    assert greedy >= 30 and chained == want


@pytest.mark.parametrize("which", ["stories260K", "tiny-hd64"])
def test_greedy_gpu_equals_cpu(which: str, tmp_path: Any, stories_path: Any) -> None:
    path = stories_path if which == "stories260K" else tiny_model_hd64(tmp_path, stories_path)
    prompts = prompts_of_different_lengths()
    cpu, _ = _greedy_generate(path, prompts, device="cpu", block_size=4)
    gpu, _ = _greedy_generate(path, prompts, device="cuda", dtype="float32", block_size=16)
    assert gpu == cpu


def test_bf16_gemv_path_close_to_cublas(
    tmp_path: Any, stories_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.gpu.helpers import generate

    path = tiny_model_hd64(tmp_path, stories_path)
    prompts = prompts_of_different_lengths()[:8]
    # fp16, not bf16: these random models are chaotic enough that one bf16 rounding flip moves
    # top logprobs past 0.1 (H200: -2.70 vs -2.60), whatever sums the flip came from.
    args = dict(device="cuda", dtype="float16", block_size=16, max_num_seqs=8, max_model_len=256)
    monkeypatch.setenv("HEADRACE_GEMV", "cublas")
    old = generate(path, prompts, max_tokens=40, **args)
    monkeypatch.setenv("HEADRACE_GEMV", "all")
    new = generate(path, prompts, max_tokens=40, **args)
    # fp32 sums in another order, then the same bf16 rounding: noise at the level of graph
    # vs eager attention splits (test_gpu_models uses 2e-2 there), with margin.
    check_logprobs_close(new.out, old.out, "gemv-vs-cublas", atol=0.1)
    # The CPU path in bf16 (as test_gpu_models: these random models move ~1.0 in bf16 vs fp32)
    cpu = generate(path, prompts, max_tokens=40, device="cpu", dtype="float16", block_size=16)
    check_logprobs_close(new.out, cpu.out, "gemv-fp16-vs-cpu-fp16", atol=1.0)


@pytest.mark.parametrize(("rows", "vocab"), [(1, 128256), (3, 1000), (64, 32000), (5, 7)])
def test_argmax_rows_matches_torch(rows: int, vocab: int) -> None:
    from cuda import argmax

    x = torch.randn(rows, vocab + 5, device=DEV)[:, :vocab]  # a padded row, as the sampler's
    x[0, vocab // 3] = x[0, vocab // 2] = 1e4  # a tie: the first index
    if rows > 2:
        x[2] = float("-inf")
    for _ in range(3):  # every call leaves the scratch reset for the next
        assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1))
        x = x + torch.randn_like(x)
        x[0, vocab // 3] = x[0, vocab // 2] = 1e4
    # inside a CUDA graph, replayed on new values
    static = x.clone()
    argmax.argmax_rows(static)  # sizes the scratch outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids = argmax.argmax_rows(static)
    for _ in range(3):
        static.copy_(torch.randn_like(static))
        graph.replay()
        assert torch.equal(ids, static.argmax(dim=-1))
