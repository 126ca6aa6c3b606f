"""4-bit checkpoints on the GPU: Int4Linear layers through the W4A16 GEMV (decode), chunked
GEMVs (a few rows) and dequantize + cuBLAS (prefill, one shared scratch buffer), against
the dequantized bf16 twin; CUDA graphs equal eager; dummy 8B AWQ weights made in 4 bits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cuda import int4_gemm as ig
from tests.gpu.helpers import generate
from tests.gpu.int4_helpers import check, random_weight
from tests.test_golden import check_logprobs_close, prompts_of_different_lengths
from tests.test_int4_models import write_int4
from tests.tiny_models import tiny_model_hd64
from worker.quant.int4_linear import Int4Linear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ARGS = dict(device="cuda", dtype="bfloat16", block_size=16, max_num_seqs=32, max_model_len=512)


@pytest.mark.parametrize("m", [5, 6, 7, 8, 9])
def test_chunked_gemv_rows_match_reference(m: int) -> None:
    w = random_weight(1000, 1024, 128, perm=m == 7, seed=m)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    out = torch.full((m, 1000), float("nan"), device="cuda", dtype=torch.bfloat16)
    y = ig.int4_linear(x, w, out=out if m <= ig.GEMV_MAX_ROWS else None)
    torch.cuda.synchronize()
    check(y, x, w)


@pytest.mark.parametrize(
    ("fmt", "layout"), [("awq", "rows"), ("gptq-desc-act", "rows"), ("awq", "tiles")]
)
def test_int4_model_close_to_its_dequantized_twin(
    fmt: str, layout: str, tmp_path, stories_path, monkeypatch
) -> None:
    from worker.quant import int4_linear

    monkeypatch.setattr(int4_linear, "LAYOUT", layout)
    src = tiny_model_hd64(tmp_path, stories_path)
    # Power-of-two scales make every dequantized weight exact in 16 bits, so the twin holds
    # the kernels' very weights; fp16 because these random models are chaotic enough that
    # one bf16 rounding flip moves top logprobs past the tolerance (seen on CPU emulating
    # the kernels' fp32 math: bf16 fails, fp16 passes; an ignored perm gives 0/9 tokens).
    int4_dir, deq_dir = write_int4(src, tmp_path, fmt, pow2_scales=True)
    prompts = prompts_of_different_lengths()
    args = dict(ARGS, dtype="float16")
    ours = generate(int4_dir, prompts, max_tokens=16, **args)
    twin = generate(deq_dir, prompts, max_tokens=16, **args)
    assert ours.graphs
    first = [o[0][0] == t[0][0] for o, t in zip(ours.out, twin.out, strict=True)]
    assert sum(first) >= 0.8 * len(first), first
    check_logprobs_close(ours.out, twin.out, fmt, atol=5e-2)


def test_int4_graphs_equal_eager(tmp_path, stories_path) -> None:
    int4_dir, _ = write_int4(tiny_model_hd64(tmp_path, stories_path), tmp_path, "awq")
    prompts = prompts_of_different_lengths()
    eager = generate(int4_dir, prompts, max_tokens=64, enforce_eager=True, **ARGS)
    graphed = generate(int4_dir, prompts, max_tokens=64, **ARGS)
    assert graphed.graphs and not eager.graphs
    check_logprobs_close(graphed.out, eager.out, "int4-graphs", atol=5e-2)


@pytest.mark.parametrize(
    ("method", "layout", "gemv", "want"),
    [
        ("awq", "rows", "v4", "stream"),  # the default: every 8B matrix is under 160 Mi weights
        ("awq", "rows", "mma", "rows"),
        ("gptq", "tiles", "v4", "tiles"),
    ],
)
def test_dummy_int4_weights_are_created_in_int4(
    method: str, layout: str, gemv: str, want: str, llama3_tokenizer_path: Path, monkeypatch
) -> None:
    from cuda import int4_gemm
    from headrace.llm import LLM
    from worker.quant import int4_linear

    monkeypatch.setattr(int4_linear, "LAYOUT", layout)
    monkeypatch.setattr(int4_gemm, "GEMV_IMPL", gemv)

    llm = LLM(
        "scripts/configs/llama-3-8b",
        tokenizer=str(llama3_tokenizer_path),  # the config folder holds no tokenizer
        load_format="dummy",
        quantization=method,
        max_model_len=1024,
        kv_cache_memory_gb=1.0,  # fixed: other test processes share the card
        enforce_eager=True,
        max_num_seqs=4,
    )
    model = llm.engine.runner.model
    layer = model.layers[0].mlp.gate_up_proj
    assert isinstance(layer, Int4Linear) and layer.qweight.dtype == torch.int32
    assert {m.layout for m in int4_linear.int4_layers(model)} == {want}  # 8B: all tile-able
    assert layer.scratch is not None and layer.scratch.numel() == 28672 * 4096
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes < 6e9  # ~5.7 GB in 4 bits (16 GB in bf16)
    from ipc.messages import SamplingParams

    out = llm.generate([[1, 2, 3] * 50], SamplingParams(temperature=0, max_tokens=8))
    assert len(out[0].outputs[0].token_ids) == 8


def test_desc_act_layers_load_and_compute_on_the_gpu_as_on_cpu(tmp_path, stories_path) -> None:
    """Narrows the gptq-desc-act twin failure down: every Int4Linear loaded on the GPU holds
    the CPU load's tensors (the loader repacks on the layer's device: qweight, scales,
    zeros, perm, reorders), and each layer alone computes the CPU's output for 1, 3, 8
    (GEMV) and 20 (dequantize + cuBLAS) rows."""
    from headrace.llm import LLM

    int4_dir, _ = write_int4(tiny_model_hd64(tmp_path, stories_path), tmp_path, "gptq-desc-act")
    small = dict(block_size=16, max_num_seqs=4, max_model_len=512, enforce_eager=True)
    gpu = LLM(str(int4_dir), device="cuda", dtype="bfloat16", kv_cache_memory_gb=1.0, **small)
    cpu = LLM(str(int4_dir), device="cpu", dtype="float32", num_gpu_blocks=64, **small)
    on_gpu = {n: m for n, m in gpu.engine.runner.model.named_modules() if isinstance(m, Int4Linear)}
    on_cpu = {n: m for n, m in cpu.engine.runner.model.named_modules() if isinstance(m, Int4Linear)}
    assert on_gpu and on_gpu.keys() == on_cpu.keys()
    assert any(m.reorders for m in on_cpu.values()), "desc_act: inputs are gathered"
    g = torch.Generator().manual_seed(0)
    for name, c in on_cpu.items():
        d = on_gpu[name]
        assert d.reorders == c.reorders and d.layout == c.layout == "rows", name
        for p in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(d, p).cpu(), getattr(c, p)), (name, p)
        if c.reorders:
            assert torch.equal(d.perm.cpu(), c.perm), (name, "perm")
        for m in (1, 3, 8, 20):
            x = torch.randn(m, c.in_features, generator=g)
            with torch.no_grad():
                want = c(x)
                got = d(x.cuda().bfloat16()).float().cpu()
            err = (got - want).abs().max().item()
            assert err <= 0.02 * want.abs().max().item() + 1e-3, (name, m, err)
    gpu.close()
    cpu.close()
