"""The benchmark model configs (scripts/configs/*) parse, build the model the Hugging Face
baseline builds (same parameter count, on the meta device: no memory), and give the decode
floor the right weight bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from headrace.bench.offline import decode_weight_bytes
from ipc.model_folder import open_model
from worker.attention import TorchAttention
from worker.model_config import ModelConfig
from worker.model_loader import model_class

CONFIGS = sorted(
    p.name for p in (Path(__file__).parent.parent / "scripts/configs").iterdir() if p.is_dir()
)


def _models(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = open_model(f"scripts/configs/{name}", "dummy").config
    mc = ModelConfig.from_hf(cfg)
    hf_cfg = transformers.AutoConfig.for_model(  # as headrace/bench/offline.py hf_baseline
        **{k: v for k, v in cfg.items() if k != "architectures"}
    )
    with torch.device("meta"):
        ours = model_class(mc)(mc, TorchAttention(), 16)
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    return ours, hf


@pytest.mark.parametrize("name", CONFIGS)
def test_bench_config_matches_hf_parameter_count(name: str) -> None:
    ours, hf = _models(name)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in hf.parameters()), name


def test_mixtral_floor_reads_only_routed_experts() -> None:
    ours, _ = _models("mixtral-8x7b")
    total = sum(p.numel() * 2 for p in ours.parameters())  # bf16 bytes
    ours = ours.to(torch.bfloat16)
    experts = 32 * 8 * 3 * 4096 * 14336 * 2
    assert decode_weight_bytes(ours, 1) == pytest.approx(total - experts * 6 / 8)
    assert 25e9 < decode_weight_bytes(ours, 1) < 27e9  # ~12.9B active parameters
    assert decode_weight_bytes(ours, 64) == pytest.approx(total, rel=1e-3)


@pytest.mark.parametrize(
    ("name", "low", "high"), [("llama-3-8b", 5.5e9, 6.0e9), ("llama-3-70b", 39e9, 41e9)]
)
def test_int4_floor_counts_packed_weights_scales_and_zeros(
    name: str, low: float, high: float
) -> None:
    from worker.quant.fp8 import cast_model
    from worker.quant.int4 import Int4Config
    from worker.quant.int4_linear import int4_layers

    cfg = open_model(f"scripts/configs/{name}", "dummy").config
    mc = ModelConfig.from_hf(cfg)
    with torch.device("meta"):
        ours = model_class(mc)(mc, TorchAttention(), 16)
        ours.quantize(Int4Config.for_dummy("awq"))
    cast_model(ours, torch.bfloat16)
    layers = int4_layers(ours)
    assert len(layers) == 4 * mc.num_layers  # qkv, o, gate_up, down
    linear = sum(m.out_features * m.in_features for m in layers)
    per_group = sum(m.out_features * m.in_features // 128 for m in layers) * 3  # fp16 + uint8
    other = sum(p.numel() * 2 for n, p in ours.named_parameters() if "proj" not in n)
    assert decode_weight_bytes(ours, 1) == linear // 2 + per_group + other
    assert low < decode_weight_bytes(ours, 1) < high  # vs 16 GB / 141 GB in bf16


def test_summary_line_prints_the_floor_at_nominal_bandwidth() -> None:
    from headrace.bench.offline import summary_line

    run = {"output_tok_s": 100.0, "total_tok_s": 150.0, "tpot_mean_ms": 4.0}
    roofline = {
        "weights": "int4 awq",
        "kv_cache_dtype": "bfloat16",
        "floor_ms_per_step": 1.4,
        "weight_GB_read_per_step": 5.73,
        "floor_ms_per_step_at_nominal": 1.35,
    }
    result = {
        "workload": "W1",
        "headrace": [run],
        "roofline": roofline,
        "num_kv_blocks": 10,
        "fraction_of_floor": 1.4 / 4.0,
        "fraction_of_nominal_floor": 1.35 / 4.0,
    }
    line = summary_line(result)
    assert "int4 awq weights" in line and "35.0% of floor" in line
    assert "5.73 GB/step at 4.25 TB/s: 1.35 ms, 33.8%" in line
