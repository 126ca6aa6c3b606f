"""4-bit checkpoints end to end on CPU: a tiny random model is quantized here into AWQ or
GPTQ tensors (tests/int4_checkpoints.py packs them from the formats' definitions), saved
with its quantization_config, and loaded by headrace; its greedy tokens and logprobs must
equal those of the same model saved with the DEQUANTIZED weights as a plain fp32
checkpoint, under chunked prefill and preemption (test_golden.py's engine settings).

Both models run the same fp32 math on the same weight values, so the logprobs agree to
float rounding (the tolerance, 1e-4, covers desc_act's permuted summation order); a wrong
nibble order, zero point, group or row lands far outside it.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.int4_checkpoints import quantized_pair
from tests.test_fp8_models import copy_folder
from tests.test_golden import (
    ENGINE_ARGS,
    prompts_of_different_lengths,
    run_headrace,
)
from tests.tiny_models import make_tiny_model
from worker.quant.int4_linear import Int4Linear

ATOL = 1e-4

# name -> (quantization_config, quantized_pair kwargs)
FORMATS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "awq": (
        {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
        dict(method="awq", group_size=32),
    ),
    "gptq-sym": (
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False},
        dict(method="gptq", group_size=32, sym=True),
    ),
    "gptq-asym": (
        {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False, "desc_act": False},
        dict(method="gptq", group_size=64, sym=False),
    ),
    "gptq-desc-act": (
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": True},
        dict(method="gptq", group_size=32, sym=False, desc_act=True),
    ),
}

# Shards fused into one of our layers read the same input (so share GPTQ's act order).
SAME_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up"}
SAME_INPUT["up_proj"] = "gate_up"


def quantized_weight(name: str, w: torch.Tensor) -> bool:
    """The linear weights a 4-bit checkpoint quantizes: all 2-D weights but embeddings,
    the LM head and Mixtral's router."""
    skip = ("embed", "lm_head", "word_embeddings", "block_sparse_moe.gate.")
    return name.endswith(".weight") and w.dim() == 2 and not any(s in name for s in skip)


def input_seed(name: str, shared_orders: bool) -> int:
    module, proj = name.removesuffix(".weight").rsplit(".", 1)
    key = f"{module}.{SAME_INPUT.get(proj, proj) if shared_orders else proj}"
    return zlib.crc32(key.encode())


def write_int4(
    src: Path, dest: Path, fmt: str, shared_orders: bool = True, pow2_scales: bool = False
) -> tuple[Path, Path]:
    """(the 4-bit checkpoint folder, its dequantized fp32 twin); pow2_scales: see
    tests/int4_checkpoints.quantize_groups."""
    qc, kwargs = FORMATS[fmt]
    tensors = load_file(str(src / "model.safetensors"))
    packed, deq = {}, {}
    for name, w in tensors.items():
        if not quantized_weight(name, w):
            packed[name] = deq[name] = w
            continue
        seed = input_seed(name, shared_orders)
        parts, w_deq = quantized_pair(w, seed=seed, pow2_scales=pow2_scales, **kwargs)
        for part, t in parts.items():
            packed[name.removesuffix("weight") + part] = t
        deq[name] = w_deq
    config = json.loads((src / "config.json").read_text())
    int4_dir = copy_folder(src, dest / "int4", packed, config | {"quantization_config": qc})
    return int4_dir, copy_folder(src, dest / "deq", deq, config)


def check_equal(ours: list, twin: list, name: str) -> None:
    for i, ((o_toks, o_lps), (t_toks, t_lps)) in enumerate(zip(ours, twin, strict=True)):
        assert o_toks == t_toks, f"{name} prompt {i}: tokens {o_toks} vs {t_toks}"
        for pos, (o_top, t_top) in enumerate(zip(o_lps, t_lps, strict=True)):
            for tok, lp in t_top.items():
                assert tok in o_top, f"{name} prompt {i} pos {pos}: top logprobs differ"
                assert abs(o_top[tok] - lp) <= ATOL, (name, i, pos, o_top[tok], lp)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import STORIES

    return make_tiny_model("llama", tmp_path_factory.mktemp("int4") / "llama", STORIES)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_int4_llama_equals_its_dequantized_twin(fmt: str, llama: Path, tmp_path: Path) -> None:
    int4_dir, deq_dir = write_int4(llama, tmp_path, fmt)
    prompts = prompts_of_different_lengths()
    ours, engine = run_headrace(int4_dir, prompts, **ENGINE_ARGS)
    assert engine.scheduler.num_preemptions > 0, "the test meant to force preemption"
    model = engine.runner.model
    qkv, down = model.layers[0].self_attn.qkv_proj, model.layers[2].mlp.down_proj
    assert isinstance(qkv, Int4Linear) and isinstance(down, Int4Linear)
    assert qkv.qweight.dtype == torch.int32 and not isinstance(model.lm_head, Int4Linear)
    assert qkv.reorders == (fmt == "gptq-desc-act")  # act order: x is gathered by perm
    twin, _ = run_headrace(deq_dir, prompts, **ENGINE_ARGS)
    check_equal(ours, twin, fmt)


def test_int4_qwen2_with_qkv_biases(tmp_path: Path, stories_path: Path) -> None:
    src = make_tiny_model("qwen2", tmp_path / "qwen2", stories_path)
    int4_dir, deq_dir = write_int4(src, tmp_path, "gptq-desc-act")
    prompts = prompts_of_different_lengths()
    ours, engine = run_headrace(int4_dir, prompts, **ENGINE_ARGS)
    assert engine.scheduler.num_preemptions > 0
    qkv = engine.runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Int4Linear) and qkv.bias is not None
    twin, _ = run_headrace(deq_dir, prompts, **ENGINE_ARGS)
    check_equal(ours, twin, "qwen2")


@pytest.mark.parametrize(
    ("kind", "fmt"),
    [("falcon-new-arch", "awq"), ("gpt-neox-parallel", "gptq-asym"), ("mixtral", "awq")],
)
def test_int4_other_families(kind: str, fmt: str, tmp_path: Path, stories_path: Path) -> None:
    """Falcon's per-KV-group q/k/v rows reorder with their scales and zeros; GPT-NeoX has a
    bias on every layer; Mixtral's 4-bit experts are dequantized on load (kept 16-bit, as
    under FP8) while its attention runs Int4Linear."""
    src = make_tiny_model(kind, tmp_path / kind, stories_path)
    int4_dir, deq_dir = write_int4(src, tmp_path, fmt)
    prompts = prompts_of_different_lengths()[:5]
    ours, engine = run_headrace(int4_dir, prompts, **ENGINE_ARGS)
    layer = engine.runner.model.layers[1]
    assert isinstance(layer.self_attn.qkv_proj, Int4Linear)
    assert isinstance(layer.self_attn.o_proj, Int4Linear)
    if kind == "mixtral":
        assert layer.mlp.w_gate_up.dtype == torch.float32
        assert not isinstance(layer.mlp.gate, Int4Linear)
    else:
        assert isinstance(layer.mlp.dense_4h_to_h, Int4Linear)
    twin, _ = run_headrace(deq_dir, prompts, **ENGINE_ARGS)
    check_equal(ours, twin, kind)
