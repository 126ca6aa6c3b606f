"""The offline benchmark keeps the engine's result whatever the HF baseline does, and the
HF baseline keeps to its time limit (headrace/bench/offline.py, hf_baseline.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from headrace.bench import hf_baseline, offline


def _args(stories_path: Path, tmp_path: Path, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    offline.add_args(p)
    return p.parse_args(
        [
            "--model",
            str(stories_path),
            "--device",
            "cpu",
            "--num-gpu-blocks",
            "32",
            "--max-model-len",
            "128",
            "--output-json",
            str(tmp_path / "out.json"),
            *extra,
        ]
    )


def _tiny_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    real = offline.make_workload

    def tiny(name: str, num_requests: int | None, seed: int) -> offline.Workload:
        w = real(name, num_requests, seed)
        return offline.Workload(w.name, [8] * len(w.prompt_lens), [4] * len(w.prompt_lens))

    monkeypatch.setattr(offline, "make_workload", tiny)


def test_engine_result_is_written_before_hf_and_an_hf_failure_is_recorded(
    stories_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    _tiny_workload(monkeypatch)
    out = tmp_path / "out.json"
    seen: dict[str, Any] = {}

    def failing_hf(args: Any, prompt_lens: list[int], output_lens: list[int]) -> dict[str, Any]:
        seen["json"] = json.loads(out.read_text())  # already there when HF starts
        seen["stdout"] = capsys.readouterr().out
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 70.86 GiB")

    monkeypatch.setattr(hf_baseline, "hf_baseline", failing_hf)
    args = _args(stories_path, tmp_path, "--workload", "W3", "--num-requests", "3")
    args.hf_requests = 2
    assert offline.throughput_main(args) == 0
    before = seen["json"]
    assert before["headrace"][0]["output_tokens"] == 12 and "hf_generate" not in before
    assert seen["stdout"].startswith("W3: ")
    after = json.loads(out.read_text())
    assert after["headrace"] == before["headrace"]
    assert after["hf_generate"] == {
        "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 70.86 GiB"
    }
    assert "speedup_vs_hf" not in after
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("W3: ") and "HF generate failed: OutOfMemoryError" in last


def test_hf_baseline_stops_at_its_time_limit_and_counts_what_it_generated(
    stories_path: Path, tmp_path: Path
) -> None:
    args = _args(stories_path, tmp_path, "--hf-time-limit", "0.5", "--hf-batch-size", "2")
    args.hf_requests = 4
    r = hf_baseline.hf_baseline(args, [8, 6, 8, 5], [480, 480, 300, 300])
    assert r["attn_implementation"] == "sdpa"
    assert r["truncated"] and r["requests"] == 2  # the first batch used up the time
    got = r["generated_per_batch"][0]
    assert 1 <= got < 480
    assert r["useful_output_tokens"] == 2 * got
    assert r["elapsed_s"] < 0.5 + 5.0  # stops after the step past the limit (a busy CPU)
    assert r["useful_output_tok_s"] == pytest.approx(2 * got / r["elapsed_s"])


def test_hf_batches_halve_on_out_of_memory_and_count_useful_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    def fake_generate(model: Any, prompts: list[list[int]], max_new: int, *rest: Any) -> int:
        calls.append(len(prompts))
        if len(prompts) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return max_new

    monkeypatch.setattr(hf_baseline, "generate_batch", fake_generate)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    r = hf_baseline.run_batches(None, [[1]] * 3, [5, 7, 2], 4, 60.0, torch.device("cpu"))
    assert calls == [3, 1, 1, 1]  # 4 capped at 3 requests, halved to 1 after one OOM
    assert r["batch_size"] == 1 and r["oom_retries"] == 1
    assert r["requests"] == 3 and r["useful_output_tokens"] == 14
    assert not r["truncated"]


def test_profile_prints_the_step_timeline_and_writes_it_to_the_json(
    stories_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    _tiny_workload(monkeypatch)
    args = _args(stories_path, tmp_path, "--workload", "W3", "--num-requests", "3", "--profile")
    assert offline.throughput_main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("step kind") and lines[-1].startswith("W3: ")
    timeline = json.loads((tmp_path / "out.json").read_text())["timeline"]
    assert set(timeline) == {"prefill/eager", "decode/eager"}  # 3 prompts of 8 in one step
    assert timeline["prefill/eager"]["steps"] == 1 and timeline["prefill/eager"]["tokens"] == 24
    assert timeline["decode/eager"]["steps"] == 3  # 4 outputs: the first comes with prefill
    assert timeline["decode/eager"]["gpu_busy_ms"] is None  # CPU: no GPU marks
