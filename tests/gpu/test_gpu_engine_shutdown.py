"""EngineCore.shutdown on a GPU: the weights, the KV cache and the CUDA graphs' pool go
back to the card while the engine object is still held."""

from __future__ import annotations

import gc

import pytest
import torch

from tests.tiny_models import tiny_model_hd64

pytestmark = pytest.mark.gpu

MiB = 1 << 20


def test_shutdown_returns_weights_kv_and_graph_pool_memory(tmp_path, stories_path):
    from headrace.llm import LLM
    from ipc.messages import SamplingParams

    path = tiny_model_hd64(tmp_path, stories_path)
    gc.collect()
    torch.cuda.empty_cache()
    allocated0, reserved0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    llm = LLM(str(path), device="cuda", dtype="bfloat16", kv_cache_memory_gb=2.0, max_num_seqs=8)
    assert llm.engine.runner.graph_runner is not None  # decode runs in CUDA graphs
    llm.generate([[1, 5, 9]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert torch.cuda.memory_allocated() - allocated0 > 2000 * MiB
    llm.close()
    # `llm` is still alive: shutdown alone gave the memory back (all but cuBLAS's
    # workspaces, tens of MiB per stream, which torch keeps for the process).
    assert torch.cuda.memory_allocated() - allocated0 < 160 * MiB
    assert torch.cuda.memory_reserved() - reserved0 < 256 * MiB
    assert llm.engine.runner.graph_runner is None
