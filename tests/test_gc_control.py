"""The start-up heap frozen out of the garbage collector's walks (worker/gc_control.py)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from ipc.messages import EngineRequest, SamplingParams
from worker import gc_control
from worker.config import EngineConfig
from worker.engine import EngineCore


def _engine(path: Path) -> EngineCore:
    return EngineCore(EngineConfig(model=str(path), device="cpu", max_num_seqs=2))


def test_engine_freezes_its_startup_heap_and_shutdown_frees_it(stories_path: Path) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    engine = _engine(stories_path)
    try:
        assert gc.get_freeze_count() > 1000  # torch's modules and the model's objects
        assert gc.get_threshold() == (*before[:2], gc_control.FULL_COLLECTION_EVERY)
        assert gc.is_tracked(engine.runner.model)
        model = weakref.ref(engine.runner.model)
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        engine.add_request(EngineRequest("a", [1, 2, 3], params))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.shutdown()
    assert gc.get_freeze_count() == 0  # shutdown's collection reaches frozen cycles too
    assert gc.get_threshold() == before
    del engine
    gc.collect()
    assert model() is None


def test_gc_freeze_off(stories_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gc.unfreeze()
    monkeypatch.setenv(gc_control.ENV, "0")
    before = gc.get_threshold()
    engine = _engine(stories_path)
    try:
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == before
    finally:
        engine.shutdown()


def test_gc_freeze_env_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gc_control.ENV, "sometimes")
    with pytest.raises(ValueError, match="HEADRACE_GC_FREEZE must be 0 or 1"):
        gc_control.freeze_startup_heap()
