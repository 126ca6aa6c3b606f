"""Issue 13's quality check (scripts/fp8_quality.py) on the CPU: SmolLM2-135M-Instruct
quantized to FP8 on load keeps its perplexity on a fixed English text close to the same
model unquantized, and still answers that the capital of France is Paris.

The check runs in fp32. In bf16 the CPU's own rounding depends on the machine: the same
commit (fb4087d) gave +2.03% and Paris on session 6's CPU and +2.34% with "L'Étoile, the
capital of France ..." on session 7's AMD EPYC (the bf16 baseline moved from 23.307 to
23.322 too). fp32 gave 23.341 -> 23.876 (+2.29%) and 23.341 -> 23.854 (+2.20%) on the two,
Paris both times (BENCHMARKS.md). Session 11 measured 23.341 -> 23.978 (+2.73%) in fp32 on
a 2-core AMD EPYC (Zen 4, AVX-512), for session 10's commit too; session 12, on the same kind
of machine with a fresh virtual environment, got +2.20% again (23.3408 -> 23.8537) for this
commit and for fb4087d, so the +2.73% came from that session's environment, not the CPU
(torch's float-to-e4m3 conversion matched an exact round-to-nearest-even one on every bf16
and fp16 value and ~110M float32s). The metric itself moves by ~0.5 points with the rounding
pattern (leaving only q_proj's weights unrounded gives +2.90%). The H200 gave +2.11% in fp32.
The test pins 1 thread and bounds the increase at 3%: the issue's 2% (a GPU figure) plus that
spread; a layer left unquantized or a wrong scale moves it far more. ~40 s on a quiet box."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from scripts.fp8_quality import run

BOUND = 0.03


@pytest.fixture
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_fp8_on_load_keeps_perplexity_and_paris(smollm2_path: Path, one_thread: None) -> None:
    base, fp8 = run("float32")
    assert base.tokens == fp8.tokens > 2000
    assert "Paris" in base.answer
    assert "Paris" in fp8.answer, fp8.answer
    # FP8 rounding costs something; zero would mean nothing was quantized.
    assert base.perplexity < fp8.perplexity <= base.perplexity * (1 + BOUND), (
        base.perplexity,
        fp8.perplexity,
    )
