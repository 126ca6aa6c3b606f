"""EngineCore.shutdown / LLM.close free the engine's tensors while the engine is still held.

Weak references to the weights and KV tensors must die at shutdown, with the engine object
alive: without it they live until the last reference to the engine goes (and the first
model build leaves a frame cycle holding the engine, torch.fx.wrap's, that only the
garbage collector breaks).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from headrace.llm import LLM
from ipc.messages import EngineRequest, SamplingParams
from worker.config import EngineConfig
from worker.cuda_graphs import CudaGraphRunner
from worker.engine import EngineCore

ENGINE_ARGS: dict[str, Any] = {"num_gpu_blocks": 32, "max_model_len": 128, "device": "cpu"}


def _tensor_refs(engine: EngineCore) -> list[weakref.ref[torch.Tensor]]:
    model = engine.runner.model
    refs: list[weakref.ref[torch.Tensor]] = [weakref.ref(p) for p in model.parameters()]
    refs += [weakref.ref(b) for b in model.buffers()]
    refs += [weakref.ref(kv) for kv in engine.runner.kv_caches]
    assert len(engine.runner.kv_caches) == engine.model_config.num_layers
    return refs


def _run_one(engine: EngineCore) -> None:
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert engine.add_request(EngineRequest("r", [1, 5, 9, 13], params)) is None
    while engine.has_unfinished_requests():
        engine.step()


def test_shutdown_frees_weights_and_kv_while_the_engine_is_held(stories_path: Path) -> None:
    engine = EngineCore(EngineConfig(model=str(stories_path), **ENGINE_ARGS))
    _run_one(engine)
    refs = _tensor_refs(engine)
    engine.shutdown()
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert alive == [], f"{len(alive)} of {len(refs)} weight/KV tensors outlived shutdown"
    # What the engine still reaches holds no memory: every tensor is on the meta device.
    model = engine.runner.model
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    rotary = [m.cos_sin for m in model.modules() if hasattr(m, "cos_sin")]
    assert rotary and all(t is None or t.is_meta for t in rotary)
    assert engine.runner.kv_caches == []


def test_release_model_reaches_our_helper_objects_tensors() -> None:
    # The attention backend (not a module) keeps a decode workspace on the GPU.
    from worker.cuda_attention import CudaAttention
    from worker.release import release_model

    backend = CudaAttention()
    backend.workspace = torch.zeros(16)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model[0].backend = backend  # type: ignore[assignment]
    model[0].table = torch.ones(3)  # type: ignore[assignment]
    release_model(model)
    assert backend.workspace is not None and backend.workspace.is_meta
    assert model[0].table.is_meta and model[0].weight.is_meta


def test_shutdown_drops_requests_refuses_work_and_is_idempotent(stories_path: Path) -> None:
    engine = EngineCore(EngineConfig(model=str(stories_path), **ENGINE_ARGS))
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    engine.add_request(EngineRequest("a", [1, 5, 9], params))
    engine.add_request(EngineRequest("b", [1, 7], params))
    engine.step()  # one running (at least), maybe one waiting
    assert engine.has_unfinished_requests()
    engine.shutdown()
    engine.shutdown()
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    with pytest.raises(RuntimeError, match="shut down"):
        engine.step()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.add_request(EngineRequest("c", [1, 2], params))


def test_shutdown_frees_the_draft_model_too(stories_path: Path) -> None:
    engine = EngineCore(
        EngineConfig(
            model=str(stories_path),
            speculative_model=str(stories_path),
            num_speculative_tokens=2,
            **ENGINE_ARGS,
        )
    )
    _run_one(engine)
    draft = engine.proposer
    assert draft is not None and hasattr(draft, "model")
    refs = [weakref.ref(p) for p in draft.model.parameters()]
    refs += [weakref.ref(kv) for kv in draft.kv_caches]
    engine.shutdown()
    gc.collect()
    assert all(r() is None for r in refs)


def test_llm_close_and_context_manager(stories_path: Path) -> None:
    with LLM(str(stories_path), **ENGINE_ARGS) as llm:
        out = llm.generate([[1, 5, 9]], SamplingParams(temperature=0, max_tokens=3))
        assert len(out[0].outputs[0].token_ids) == 3
        refs = _tensor_refs(llm.engine)
    gc.collect()
    assert llm.engine.closed
    assert all(r() is None for r in refs)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[1, 5, 9]], SamplingParams(max_tokens=3))


class _FakeGraph:
    def __init__(self) -> None:
        self.was_reset = False

    def reset(self) -> None:
        self.was_reset = True


def test_graph_runner_release_destroys_graphs_and_drops_outputs() -> None:
    # CUDA graphs cannot be captured on CPU: a runner holding stand-ins shows what release
    # does (reset every graph, so its pool can be returned; drop outputs and the KV list).
    runner = CudaGraphRunner.__new__(CudaGraphRunner)
    graphs = {(1, 1): _FakeGraph(), (1, 2): _FakeGraph()}
    runner.graphs = graphs  # type: ignore[assignment]
    out = torch.zeros(4)
    out_ref = weakref.ref(out)
    runner.outputs = {(1, 1): out}
    greedy = {2: _FakeGraph()}  # the decode graphs that end in the argmax
    runner.greedy_graphs = greedy  # type: ignore[assignment]
    runner.greedy_outputs = {2: torch.zeros(2, dtype=torch.int64)}
    kv = [torch.zeros(2)]
    runner.kv_caches = kv
    del out
    runner.release()
    assert all(g.was_reset for g in [*graphs.values(), *greedy.values()])
    assert runner.graphs == {} and runner.outputs == {} and runner.kv_caches == []
    assert runner.greedy_graphs == {} and runner.greedy_outputs == {}
    assert out_ref() is None
