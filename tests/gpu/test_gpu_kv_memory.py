"""--kv-cache-memory-gb on a GPU: a fixed KV size, whatever else holds memory on the card."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import tiny_model_hd64

pytestmark = pytest.mark.gpu


def test_fixed_kv_size_on_gpu_and_a_clear_error_when_it_cannot_fit(tmp_path, stories_path):
    from headrace.llm import LLM
    from worker.model_runner import kv_bytes_per_block

    path = tiny_model_hd64(tmp_path, stories_path)
    llm = LLM(str(path), device="cuda", dtype="bfloat16", kv_cache_memory_gb=0.25)
    per_block = kv_bytes_per_block(llm.engine.model_config, 16, torch.bfloat16)
    assert llm.engine.kv.num_blocks == (1 << 28) // per_block
    del llm
    with pytest.raises(ValueError, match="kv-cache-memory-gb 100000 does not fit"):
        LLM(str(path), device="cuda", dtype="bfloat16", kv_cache_memory_gb=100000)
