"""The step timeline (worker/step_timeline.py): step kinds, host phases, GPU busy and gap
arithmetic (through a fake clock on CPU), and that attaching it changes no output."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipc.messages import EngineRequest, SamplingParams
from worker.config import EngineConfig
from worker.engine import EngineCore
from worker.request import Request
from worker.scheduler import ScheduledRequest, SchedulerOutput
from worker.step_timeline import PHASES, StepRecord, StepTimeline, format_summary, step_kind


def _req(prompt_len: int, outputs: int = 0) -> Request:
    r = Request("r", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8), frozenset())
    r.output_token_ids.extend([5] * outputs)
    r.all_token_ids.extend([5] * outputs)
    return r


def test_step_kind() -> None:
    decoding = ScheduledRequest(_req(4, outputs=2), 1, 5)
    verifying = ScheduledRequest(_req(4, outputs=2), 3, 5, num_spec_tokens=2)
    chunk = ScheduledRequest(_req(40), 16, 16)
    last_prompt_token = ScheduledRequest(_req(4), 1, 3)  # the prompt's end, not a decode
    assert step_kind(SchedulerOutput([decoding, verifying])) == "decode"
    assert step_kind(SchedulerOutput([chunk, last_prompt_token])) == "prefill"
    assert step_kind(SchedulerOutput([decoding, chunk])) == "mixed"


class FakeClock:
    """Marks are the times a test gives, in ms."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def mark(self) -> float:
        return self.times.pop(0)

    def elapsed_ms(self, a: float, b: float) -> float:
        return b - a


def test_busy_and_gap_from_marks() -> None:
    tl = StepTimeline.__new__(StepTimeline)
    tl.clock = FakeClock()
    tl.records = [
        StepRecord("decode", True, start=0.0, end=4.0),
        StepRecord("decode", True, start=4.5, end=9.0),  # GPU idle 0.5 ms between
        StepRecord("decode", True, start=8.0, end=12.0),  # queued while busy: no gap
        StepRecord("prefill", False, start=13.0, end=20.0),
    ]
    s = tl.summary()
    assert s["decode/graph"]["steps"] == 3
    assert s["decode/graph"]["gpu_busy_ms"] == pytest.approx((4 + 4.5 + 4) / 3)
    assert s["decode/graph"]["gap_ms"] == pytest.approx((0.5 + 0.0) / 2)
    assert s["prefill/eager"]["gap_ms"] == pytest.approx(1.0)
    assert s["prefill/eager"]["gpu_busy_ms"] == pytest.approx(7.0)
    assert s["decode/graph"]["gap_max_ms"] == pytest.approx(0.5)
    assert s["decode/graph"]["gap_total_ms"] == pytest.approx(0.5)
    assert s["decode/graph"]["gap_p50_ms"] == pytest.approx(0.5)  # of [0.0, 0.5]
    worst = tl.worst_gaps(2)
    assert [(w["step"], w["kind"], w["prev_kind"]) for w in worst] == [
        (3, "prefill/eager", "decode"),
        (1, "decode/graph", "decode"),
    ]
    assert worst[0]["gap_ms"] == pytest.approx(1.0)


def _engine(path: Path) -> EngineCore:
    return EngineCore(
        EngineConfig(
            model=str(path),
            device="cpu",
            max_num_batched_tokens=32,
            max_num_seqs=4,
            enable_prefix_caching=False,  # every run computes every prompt token
        )
    )


def _run(engine: EngineCore, tag: str, late_after: int = 3) -> dict[str, list[int]]:
    """One long prompt (chunked), a second arriving mid-way: prefill, mixed, decode steps."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens: dict[str, list[int]] = {f"{tag}a": [], f"{tag}b": []}
    engine.add_request(EngineRequest(f"{tag}a", list(range(3, 80)), params))
    steps = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
        steps += 1
        if steps == late_after:
            engine.add_request(EngineRequest(f"{tag}b", list(range(7, 47)), params))
    return tokens


def test_timeline_on_cpu_records_every_step_and_changes_nothing(stories_path: Path) -> None:
    engine = _engine(stories_path)
    plain = _run(engine, "p")
    sampler, schedule = engine.runner.sampler, engine.scheduler.schedule
    tl = StepTimeline(engine).attach()
    timed = _run(engine, "t")
    tl.detach()
    assert engine.runner.sampler is sampler and engine.scheduler.schedule == schedule
    assert "step_with_owners" not in vars(engine) and "forward" not in vars(engine.runner.model)
    assert list(timed.values()) == list(plain.values())  # same tokens with the timeline on
    kinds = [r.kind for r in tl.records]
    assert {"prefill", "mixed", "decode"} <= set(kinds)
    assert kinds[0] == "prefill" and kinds[-1] == "decode"
    # 77 + 40 prompt tokens, 12 outputs each (the last ones are not computed again).
    assert sum(r.num_tokens for r in tl.records) == 77 + 40 + 2 * 11
    for r in tl.records:
        assert not r.graph and r.start is None and r.busy_ms is None  # CPU: no GPU marks
        assert r.host_s["schedule"] > 0 and r.host_s["forward"] > 0 and r.host_s["outputs"] >= 0
        assert sum(r.host_s.values()) == pytest.approx(r.wall_s, rel=1e-6, abs=1e-6)
    s = tl.summary()
    assert sum(row["steps"] for row in s.values()) == len(tl.records)  # type: ignore[misc]
    assert sum(r.host_s["outputs"] for r in tl.records) > 0
    table = format_summary(s)
    assert "decode/eager" in table and "prefill/eager" in table
    assert all(p in table for p in PHASES)
    tl.records.clear()
    _run(engine, "u")  # detached: nothing recorded
    assert tl.records == []
