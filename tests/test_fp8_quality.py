"""Issue 13's quality check (scripts/fp8_quality.py) on the CPU: SmolLM2-135M-Instruct
quantized to FP8 on load keeps its perplexity on a fixed English text within 2% of the same
model in bf16, and still answers that the capital of France is Paris. ~35 s on the dev box."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.fp8_quality import MAX_PPL_INCREASE, run


@pytest.mark.slow
def test_fp8_on_load_keeps_perplexity_and_paris(smollm2_path: Path) -> None:
    base, fp8 = run("bfloat16")
    assert base.tokens == fp8.tokens > 2000
    assert "Paris" in base.answer
    assert "Paris" in fp8.answer, fp8.answer
    # FP8 rounding costs something (1.85% measured); zero would mean nothing was quantized.
    assert base.perplexity < fp8.perplexity <= base.perplexity * (1 + MAX_PPL_INCREASE), (
        base.perplexity,
        fp8.perplexity,
    )
