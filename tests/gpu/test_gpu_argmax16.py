"""cuda/argmax.py on the GPU: fp32, bf16 and fp16 rows against torch.argmax (first index of
the maximum, -0 ties +0, NaN highest), aligned and unaligned rows, graph replays, and the
greedy decode graph (16-bit LM head output straight into the argmax) against the eager fp32
sampler path on a tiny random model.

Outputs come from blocks filled with a poison id and freed, so an unwritten id shows. The
torch fallback is patched to raise, so a silent fallback fails instead of passing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cuda import argmax

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCABS = [1, 7, 1023, 1025, 128256, 151936]


@pytest.fixture(autouse=True)
def _no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError(f"torch fallback for {x.dtype} {list(x.shape)} {x.stride()}")

    monkeypatch.setattr(argmax, "argmax_ref", refuse)


def _run(x: torch.Tensor) -> torch.Tensor:
    poison = torch.full((x.shape[0] + 64,), -7, dtype=torch.int64, device=DEV)
    del poison  # the output's block held -7s
    return argmax.argmax_rows(x)


def _want(x: torch.Tensor) -> torch.Tensor:
    return x.cpu().argmax(dim=-1).to(DEV)  # torch's CPU rule: the one checked for 16-bit NaN


NEG_NAN = {torch.float32: -4194304, torch.bfloat16: -64, torch.float16: -512}  # 0xffc00000 ..
INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _plant(r: torch.Tensor, case: int) -> None:
    """Row r gets hard case `case`: ties, -0/+0, NaN of either sign, -inf, equal values."""
    v = r.shape[0]
    nan, inf = float("nan"), float("inf")
    if case == 0:
        r[v // 3] = r[v - 1] = 30.0  # a tie: the first index wins
    elif case == 1:
        r.fill_(-0.0)
        r[v // 2] = 0.0  # -0 ties +0: index 0
    elif case == 2:
        r.fill_(-1.0)
        r[v - 1] = 0.0
        r[v // 2] = -0.0  # the first of the zeros, whatever its sign
    elif case == 3:
        r[v // 2] = nan  # NaN ranks highest
    elif case == 4:
        r[v - 1] = nan
        r.view(INT[r.dtype])[v // 4] = NEG_NAN[r.dtype]  # a negative NaN ranks as high
    elif case == 5:
        r.fill_(-inf)  # index 0
    elif case == 6:
        r.fill_(-inf)
        r[v - 1] = -60000.0
    elif case == 7:
        r.fill_(2.5)  # all equal: index 0
    elif case == 8:
        r[v // 2] = r[v - 1] = inf
    elif case == 9:
        r.fill_(nan)  # all NaN: index 0


def _rows(rows: int, vocab: int, dtype: torch.dtype, pad: int, seed: int) -> torch.Tensor:
    """Random rows (16-bit ones hold many exact ties) with the hard cases planted in the
    first ten; a view [:, :vocab] of a wider tensor when pad > 0 (the sampler's rows)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(rows, vocab + pad, generator=g, device=DEV).to(dtype)[:, :vocab]
    for i in range(min(rows, 10)):
        _plant(x[i], i)
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", [1, 880])
def test_argmax_rows_matches_torch(rows: int, vocab: int, dtype: torch.dtype) -> None:
    for pad, seed in ((0, 0), (8, 1), (5, 2)):  # 5: rows start unaligned -> scalar loads
        x = _rows(rows, vocab, dtype, pad, seed)
        for _ in range(2):  # every call leaves the scratch reset for the next
            got = _run(x)
            assert torch.equal(got, _want(x)), (pad, (got != _want(x)).nonzero()[:5])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_unaligned_slices_and_tails(dtype: torch.dtype) -> None:
    """Row starts at every 2-byte offset (scalar path) and vocab sizes around a 16-byte
    vector's edge (the vector path's scalar tail)."""
    base = torch.randn(33, 4096 + 16, device=DEV).to(dtype)
    for off in range(9):
        for vocab in (8, 9, 15, 16, 17, 2047, 2048, 2049, 4096):
            x = base[:, off : off + vocab]
            assert argmax.vectorized(x) == (off % 8 == 0)
            x[1, vocab - 1] = 100.0  # the max in the tail
            x[2, 0] = x[2, vocab - 1] = 100.0  # a tie across vector and tail
            assert torch.equal(_run(x), _want(x)), (off, vocab)
            base.normal_()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_argmax_rows_graph_replay(dtype: torch.dtype) -> None:
    static = _rows(64, 128256, dtype, 8, 3)
    argmax.argmax_rows(static)  # sizes the scratch outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids = argmax.argmax_rows(static)
    for seed in range(4):
        static.copy_(_rows(64, 128256, dtype, 8, 10 + seed))
        graph.replay()
        assert torch.equal(ids, _want(static))


def test_bf16_argmax_equals_fp32_of_the_cast() -> None:
    """What the greedy graph relies on: the 16-bit argmax is the argmax of its fp32 cast."""
    x = torch.randn(880, 128256, device=DEV).to(torch.bfloat16)
    assert torch.equal(_run(x), _run(x.float()))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_greedy_paths_equal_fp32_sampler(
    dtype: str, tmp_path: Any, stories_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two 16-bit greedy tails vs fp32 compute_logits + the sampler (logprobs asked, so
    neither shortcut is taken), on the same decode graphs: the same tokens. (1) the greedy
    decode graphs (LM head output straight into the argmax); (2) with no greedy graphs,
    the eager all-greedy step (greedy_logits, the sampler's argmax without its fp32 copy)."""
    from tests.gpu.helpers import generate
    from tests.gpu.test_gpu_step_kernels import _greedy_generate
    from tests.test_golden import prompts_of_different_lengths
    from tests.tiny_models import tiny_model_hd64
    from worker import cuda_graphs
    from worker.models.base import CausalLM

    path = tiny_model_hd64(tmp_path, stories_path)
    prompts = prompts_of_different_lengths()[:8]
    args = dict(device="cuda", dtype=dtype, block_size=16, max_num_seqs=16, max_model_len=256)
    sampled = generate(path, prompts, max_tokens=40, **args)
    want = [t for t, _ in sampled.out]
    graphed, greedy = _greedy_generate(path, prompts, **args)
    assert greedy >= 30, "decode steps should replay the greedy graphs"
    assert graphed == want
    calls: list[torch.dtype] = []
    real = CausalLM.greedy_logits

    def counted(self: CausalLM, hidden: torch.Tensor) -> torch.Tensor:
        out = real(self, hidden)
        calls.append(out.dtype)
        return out

    monkeypatch.setattr(CausalLM, "greedy_logits", counted)
    monkeypatch.setattr(cuda_graphs, "GREEDY_MAX_BS", 0)  # no greedy graphs: the eager tail
    eager, greedy = _greedy_generate(path, prompts, **args)
    assert greedy == 0 and len(calls) >= 30 and set(calls) == {getattr(torch, dtype)}
    assert eager == want
