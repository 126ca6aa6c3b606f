"""KV cache sizing: the budget covers the draft model's KV blocks too."""

from __future__ import annotations

import torch

from ipc.model_folder import open_model
from worker.config import EngineConfig
from worker.engine import EngineCore
from worker.model_config import ModelConfig
from worker.model_facts import param_bytes
from worker.model_runner import kv_bytes_per_block


def test_param_bytes_matches_the_built_model(stories_path):
    from worker.attention import TorchAttention
    from worker.models.llama import LlamaForCausalLM

    mc = ModelConfig.from_hf(open_model("scripts/configs/llama-3-8b", "dummy").config)
    assert param_bytes(mc, torch.bfloat16) == 16_060_522_496  # Llama-3-8B in bf16
    mc = ModelConfig.from_hf(open_model(str(stories_path)).config)
    with torch.device("meta"):
        model = LlamaForCausalLM(mc, TorchAttention(), 16)
    assert param_bytes(mc, torch.float32) == 4 * sum(p.numel() for p in model.parameters())


def test_kv_budget_is_shared_with_the_draft_model(stories_path):
    gb = 0.01
    plain = EngineCore(EngineConfig(model=str(stories_path), device="cpu", kv_cache_memory_gb=gb))
    spec = EngineCore(
        EngineConfig(
            model=str(stories_path),
            device="cpu",
            kv_cache_memory_gb=gb,
            speculative_model=str(stories_path),
            num_speculative_tokens=2,
            max_num_seqs=8,
        )
    )
    per_block = kv_bytes_per_block(plain.model_config, 16, torch.float32)
    budget = int(gb * (1 << 30))
    assert plain.kv.num_blocks == budget // per_block
    # The draft (the same model here) needs a block per target block plus 8 requests x 1.
    assert spec.kv.num_blocks == (budget - 8 * per_block) // (2 * per_block)


def test_kv_cache_memory_gb_defaults_to_one_gib_on_cpu_and_is_validated(stories_path):
    import pytest

    engine = EngineCore(EngineConfig(model=str(stories_path), device="cpu"))
    per_block = kv_bytes_per_block(engine.model_config, 16, torch.float32)
    assert engine.kv.num_blocks == (1 << 30) // per_block
    with pytest.raises(ValueError, match="kv_cache_memory_gb"):
        EngineConfig(model=str(stories_path), device="cpu", kv_cache_memory_gb=0).validate()
