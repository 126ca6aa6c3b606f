"""HEADRACE_STEP_TIMELINE (worker/serve_timeline.py): a serving worker on real sockets, a
real engine on CPU, writes one report per busy period: its requests, output tokens, span,
the loop's parts and the step timeline of every step it ran; nothing without the variable."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import zmq

from ipc.messages import EngineOutputs, EngineRequest, Hello, ModelInfo, SamplingParams
from ipc.wire import GatewayCodec, connect_dealer
from worker import serve_timeline
from worker.config import EngineConfig
from worker.engine import EngineCore
from worker.server import WorkerServer


def _serve(
    stories: Path, address: str, batches: list[list[tuple[str, int, int]]]
) -> dict[str, list[int]]:
    """Run each batch of (id, prompt length, max_tokens) through a WorkerServer to the end,
    one batch after the other (each its own busy period); the tokens per request."""
    cfg = EngineConfig(
        model=str(stories),
        device="cpu",
        max_num_batched_tokens=32,
        max_num_seqs=4,
        enable_prefix_caching=False,  # prompts share prefixes: every token is computed
    )
    server = WorkerServer(lambda: EngineCore(cfg), address, heartbeat_interval=0.05)
    server.start()
    ctx = zmq.Context()
    sock = connect_dealer(ctx, address, "gw")
    codec = GatewayCodec()
    tokens: dict[str, list[int]] = {}
    try:
        time.sleep(0.2)
        sock.send(codec.encode(Hello("gw")))
        assert isinstance(codec.decode(sock.recv()), ModelInfo)
        for batch in batches:
            for rid, n, m in batch:
                params = SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                sock.send(codec.encode(EngineRequest(rid, list(range(3, 3 + n)), params)))
                tokens[rid] = []
            left = {rid for rid, _, _ in batch}
            deadline = time.monotonic() + 60
            while left and time.monotonic() < deadline:
                if not sock.poll(50):
                    continue
                msg = codec.decode(sock.recv())
                if isinstance(msg, EngineOutputs):
                    for o in msg.outputs:
                        tokens[o.request_id] += o.new_token_ids
                        if o.finished:
                            left.discard(o.request_id)
            assert not left, f"unfinished: {left}"
            time.sleep(0.3)  # the idle pass that ends the period and writes the report
    finally:
        sock.close(0)
        ctx.term()
        server.stop()
    return tokens


def test_report_per_busy_period(
    stories_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = tmp_path / "timeline.json"
    monkeypatch.setenv(serve_timeline.ENV, str(report))
    batch = [("a", 40, 6), ("b", 70, 9), ("c", 5, 3)]
    tokens = _serve(stories_path, f"ipc://{tmp_path}/w.sock", [batch])
    assert [len(tokens[r]) for r, _, _ in batch] == [6, 9, 3]
    rep = json.loads(report.read_text())
    assert rep["requests"] == 3 and rep["output_tokens"] == 18
    assert 0 <= rep["arrivals_s"] <= rep["span_s"] and rep["span_s"] > 0
    assert rep["output_tok_s"] == pytest.approx(18 / rep["span_s"])
    assert set(rep["loop_s"]) == set(serve_timeline.PARTS)
    assert rep["loop_s"]["step"] > 0 and all(v >= 0 for v in rep["loop_s"].values())
    assert sum(rep["loop_s"].values()) <= rep["span_s"] + 0.05
    rows = rep["timeline"]
    # Every step of the period is in it: the prompts' tokens once (chunked at 32), then one
    # token a step per request until its last (whose token is not computed again).
    computed = sum(r["steps"] * r["tokens"] for r in rows.values())
    assert computed == pytest.approx(40 + 70 + 5 + (6 - 1) + (9 - 1) + (3 - 1))
    assert any(k.startswith("prefill") for k in rows) and any(k.startswith("decode") for k in rows)


def test_each_period_overwrites_and_detaches(
    stories_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = tmp_path / "timeline.json"
    monkeypatch.setenv(serve_timeline.ENV, str(report))
    _serve(stories_path, f"ipc://{tmp_path}/w.sock", [[("a", 20, 4)], [("b", 9, 2), ("c", 9, 2)]])
    rep = json.loads(report.read_text())
    assert rep["requests"] == 2 and rep["output_tokens"] == 4  # the second period only
    computed = sum(r["steps"] * r["tokens"] for r in rep["timeline"].values())
    assert computed == 9 + 9 + 1 + 1  # none of the first period's steps


def test_nothing_without_the_variable(
    stories_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(serve_timeline.ENV, raising=False)
    assert serve_timeline.from_env(object()) is None
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    _serve(stories_path, f"ipc://{tmp_path}/w.sock", [[("a", 10, 3)]])
    assert list(cwd.iterdir()) == []
