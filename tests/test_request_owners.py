"""The engine owns its requests and their owners (the worker server keeps no map of its
own): owner_of / request_ids answer from the engine's requests, and every output of
step_with_owners goes to the owner of its request, a grammar's failure too."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ipc.messages import EngineRequest, FinishReason, GrammarKind, GuidedDecoding, SamplingParams
from worker.config import EngineConfig


def make_engine(kind: str, stories_path: Path) -> Any:
    config = EngineConfig(model=str(stories_path), max_num_seqs=4)
    if kind == "fake":
        from worker.fake_engine import FakeEngineCore

        return FakeEngineCore(config)
    from worker.engine import EngineCore

    return EngineCore(config)


@pytest.mark.parametrize("kind", ["fake", "engine"])
def test_outputs_go_to_the_owner_of_their_request(kind: str, stories_path: Path) -> None:
    engine = make_engine(kind, stories_path)
    for rid, owner, n in (("a1", b"gw-a", 3), ("a2", b"gw-a", 1), ("b1", b"gw-b", 2)):
        assert (
            engine.add_request(EngineRequest(rid, [1, 5], SamplingParams(max_tokens=n)), owner)
            is None
        )
    # A second request under a taken id is refused and leaves the first one's owner alone.
    dup = engine.add_request(EngineRequest("a1", [1], SamplingParams(max_tokens=1)), b"gw-b")
    assert dup is not None and dup.finish_reason == FinishReason.ERROR
    assert (engine.owner_of("a1"), engine.owner_of("b1"), engine.owner_of("zz")) == (
        b"gw-a", b"gw-b", None
    )  # fmt: skip
    assert sorted(engine.request_ids(owner=b"gw-a")) == ["a1", "a2"]
    assert sorted(engine.request_ids()) == ["a1", "a2", "b1"]
    engine.abort_requests(["a2"])
    assert engine.owner_of("a2") is None and sorted(engine.request_ids()) == ["a1", "b1"]
    seen: dict[str, set[bytes]] = {}
    for _ in range(50):
        for owner, out in engine.step_with_owners():
            seen.setdefault(out.request_id, set()).add(owner)
        if not engine.has_unfinished_requests():
            break
    assert seen == {"a1": {b"gw-a"}, "b1": {b"gw-b"}}
    assert engine.request_ids() == [] and engine.owner_of("a1") is None


def test_a_request_waiting_for_its_grammar_is_owned_too(stories_path: Path) -> None:
    engine = make_engine("engine", stories_path)
    bad = SamplingParams(max_tokens=8, guided=GuidedDecoding(GrammarKind.REGEX, "[a-"))
    assert engine.add_request(EngineRequest("bad", [1, 2, 3], bad), b"gw-c") is None
    assert engine.owner_of("bad") == b"gw-c" and engine.request_ids(owner=b"gw-c") == ["bad"]
    failed = []
    deadline = time.monotonic() + 60  # the grammar compiles in a thread
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        failed += [(o, out) for o, out in engine.step_with_owners() if out.error]
    assert [(o, out.request_id) for o, out in failed] == [(b"gw-c", "bad")]
    assert engine.owner_of("bad") is None
