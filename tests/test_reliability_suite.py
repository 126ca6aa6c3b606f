"""The scripts in scripts/reliability/, run small: many streams with cancellations, a
worker killed mid-stream, slow and half-open clients, the hostile-body corpus."""

from __future__ import annotations

import pytest

from scripts.reliability import hostile, kill_worker, slow_clients, streams

pytestmark = pytest.mark.reliability


def test_streams_with_a_third_cancelling() -> None:
    r = streams.run(streams=300, max_tokens=32, step_ms=10)
    assert r["results"] == {"ok": 200, "cancelled": 100}, r
    assert r["running_after"] == 0 and r["inflight_after"] == 0, r
    assert r["gateway_errors_logged"] == 0


def test_worker_killed_mid_stream() -> None:
    r = kill_worker.run(streams=60, max_tokens=400)
    killed = r["on_killed_worker"]
    assert 0 < killed < 60, r
    assert r["results"] == {"ok": 60 - killed, "error event": killed}, r
    assert r["error_event_within_s"] < 5, r
    assert r["request_after_kill"] == 200 and r["gateway_errors_logged"] == 0, r


def test_slow_and_half_open_clients() -> None:
    r = slow_clients.run(connections=100, timeout=1.0)
    assert r["still_open_after_30s"] == 0 and r["max_seconds_to_close"] < 5, r
    assert r["gateway_errors_logged"] == 0, r


def test_hostile_corpus() -> None:
    r = hostile.run(rounds=1)
    assert r["failures"] == [] and r["healthy_after"] and r["gateway_tracebacks"] == 0, r
    assert not any(status >= 500 for status in r["statuses"]), r
