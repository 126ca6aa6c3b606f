"""Batch limits by device, as vLLM's (worker/batch_defaults.py), and what runs report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from headrace.bench import offline
from worker.batch_defaults import GiB, batch_defaults, resolve_batch_limits
from worker.config import EngineConfig

H200 = (150_121_545_728, "NVIDIA H200")  # 139.8 GiB
H100 = (85_029_158_912, "NVIDIA H100 80GB HBM3")
A100 = (85_089_976_320, "NVIDIA A100-SXM4-80GB")
L40S = (48 * GiB, "NVIDIA L40S")


@pytest.mark.parametrize(
    ("card", "usage", "want"),
    [
        (H200, "offline", (1024, 16384)),
        (H200, "server", (1024, 8192)),
        (H100, "offline", (1024, 16384)),
        (A100, "offline", (256, 8192)),  # vLLM: the large budget measured slower on A100
        (L40S, "server", (256, 8192)),
    ],
)
def test_gpu_defaults_follow_the_cards_memory(
    card: tuple[int, str], usage: str, want: tuple[int, int]
) -> None:
    d = batch_defaults("cuda", usage, *card)
    assert (d.max_num_seqs, d.max_num_batched_tokens) == want


def test_cpu_keeps_small_limits_and_flags_always_win() -> None:
    cpu = batch_defaults("cpu", "offline", *H200)
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (256, 512)
    big = batch_defaults("cuda", "offline", *H200)
    assert resolve_batch_limits(None, None, big, True, 8192) == (1024, 16384)
    assert resolve_batch_limits(256, None, big, True, 8192) == (256, 16384)
    assert resolve_batch_limits(None, 4096, big, True, 8192) == (1024, 4096)
    assert resolve_batch_limits(None, 300, big, True, 8192) == (300, 300)  # seqs <= tokens
    assert resolve_batch_limits(7, 99, big, True, 8192) == (7, 99)
    # Without chunked prefill a default budget holds a whole prompt; a given one stays.
    assert resolve_batch_limits(None, None, cpu, False, 2048) == (256, 2048)
    assert resolve_batch_limits(None, 600, cpu, False, 2048) == (256, 600)


def test_usage_context_is_validated_by_name() -> None:
    with pytest.raises(ValueError, match="usage_context"):
        EngineConfig(model="m", usage_context="batch").validate()
    with pytest.raises(ValueError, match="usage_context"):
        batch_defaults("cuda", "batch")
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(model="m", max_num_seqs=0).validate()


def _bench(stories_path: Path, tmp_path: Path, *extra: str) -> dict[str, Any]:
    import argparse

    p = argparse.ArgumentParser()
    offline.add_args(p)
    out = tmp_path / "out.json"
    args = p.parse_args(
        ["--model", str(stories_path), "--device", "cpu", "--num-gpu-blocks", "64"]
        + ["--max-model-len", "128", "--workload", "W3", "--num-requests", "3"]
        + ["--output-json", str(out), *extra]
    )
    assert offline.throughput_main(args) == 0
    return json.loads(out.read_text())


def test_bench_throughput_reports_the_limits_it_ran_with(
    stories_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    real = offline.make_workload

    def tiny(name: str, num_requests: int | None, seed: int) -> offline.Workload:
        w = real(name, num_requests, seed)
        return offline.Workload(w.name, [8] * len(w.prompt_lens), [4] * len(w.prompt_lens))

    monkeypatch.setattr(offline, "make_workload", tiny)
    r = _bench(stories_path, tmp_path)
    assert (r["max_num_seqs"], r["max_num_batched_tokens"]) == (256, 512)  # CPU defaults
    assert r["config"]["usage_context"] == "offline"
    assert (
        "[max_num_seqs 256, max_num_batched_tokens 512, 0 preemptions]" in capsys.readouterr().out
    )
    r = _bench(stories_path, tmp_path, "--max-num-seqs", "2", "--max-num-batched-tokens", "64")
    assert (r["max_num_seqs"], r["max_num_batched_tokens"]) == (2, 64)
    assert r["headrace"][0]["output_tokens"] == 12


@pytest.mark.parametrize("admission", ["", "reserve"])
def test_a_thousand_running_requests_preempt_and_all_finish(
    admission: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_num_seqs 1024 with KV for ~300 full-length requests: the scheduler admits by
    blocks, preempts when decodes run out of them, and every request still gets its
    length (no model: stub tokens). HEADRACE_ADMISSION=reserve admits only what fits at
    full length: no preemption at all."""
    monkeypatch.setenv("HEADRACE_ADMISSION", admission)
    from ipc.messages import SamplingParams
    from worker.config import SchedulerConfig
    from worker.kv_cache import KVCacheManager
    from worker.request import Request
    from worker.scheduler import Scheduler

    kv = KVCacheManager(300 * 3, 16, enable_caching=True)  # 48 tokens x 300
    sched = Scheduler(SchedulerConfig(1024, 16384, 256), kv)
    for i in range(1000):
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        sched.add_request(Request(f"r{i}", [5 + i % 300] * 24, params, frozenset()))
    done: dict[str, int] = {}
    peak = 0
    while sched.has_unfinished_requests():
        out = sched.schedule()
        peak = max(peak, len(out.scheduled))
        for req, _ in sched.update(out, [[7] if sr.samples else [] for sr in out.scheduled]):
            if req.is_finished:
                done[req.request_id] = req.num_output_tokens
    assert len(done) == 1000 and set(done.values()) == {24}
    if admission:
        assert sched.num_preemptions == 0 and 256 < peak <= 300  # 300 fit at full length
    else:
        assert sched.num_preemptions > 0 and peak > 300  # more than fit: preempted later
    assert kv.num_free_blocks == kv.num_blocks


def test_cuda_graph_buckets_cover_every_batch_up_to_1024() -> None:
    from worker.cuda_graphs import bucket_sizes, pick_graph

    buckets = bucket_sizes(1024)
    assert len(buckets) == 44 and buckets[-1] == 1024 and buckets == sorted(set(buckets))
    for n in range(1, 1025):
        key = pick_graph([1], buckets, n, 1)
        assert key is not None and n <= key[1] <= n + (16 if n <= 256 else 31)
    assert pick_graph([1], buckets, 1025, 1) is None  # past the largest graph: eager
    assert bucket_sizes(1000)[-1] == 1000 and bucket_sizes(4096)[-1] == 1024
