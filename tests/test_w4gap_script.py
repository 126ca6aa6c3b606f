"""scripts/w4gap.sh (gpu_bench.sh's `w4gap` step) end to end on CPU: offline W3, then
headrace serve + bench serve at infinite rate on the same requests, then the gap line.

The GPU machine runs it once, so every command in it must work the first time: here the
same script runs with a tiny config-only Llama (dummy weights, a 4096-token context as the
8B shape's run uses) and three requests."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.server_harness import REPO, free_port

pytestmark = [pytest.mark.process, pytest.mark.slow]

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 512, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 4096, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}  # fmt: skip


def test_w4gap_runs_offline_and_http_and_prints_the_gap(tmp_path: Path, stories_path: Path) -> None:
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "out"
    out.mkdir()
    env = os.environ | {
        "OUT": str(out),
        "W4GAP_MODEL": str(model),
        "W4GAP_TOKENIZER": str(stories_path),
        "W4GAP_N": "3",
        "W4GAP_ENGINE": "--device cpu --kv-cache-memory-gb 0.25",
        "W4GAP_PORT": str(free_port()),
    }
    run = subprocess.run(
        ["bash", "scripts/w4gap.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    text = run.stdout + run.stderr
    assert re.search(r"offline W3 3 requests \(rc 0,", text), text
    assert re.search(r"serve ready \(rc 0,", text), text
    assert re.search(r"bench serve inf 3 requests \(rc 0,", text), text
    gap = re.search(r"W4 gap: offline W3 ([\d.]+) output tok/s, HTTP inf ([\d.]+) output tok/s, "
                    r"3 completed / 0 failed: (-?[\d.]+)% below offline", text)  # fmt: skip
    assert gap, text
    served = json.loads((out / "w4gap_serve.json").read_text())
    assert served["workload"] == "W3" and served["temperature"] == 0.0
    offline = json.loads((out / "w4gap_offline.json").read_text())
    # The same requests: bench serve --workload W3 asks for the offline run's output lengths.
    assert served["runs"][-1]["total_output_tokens"] == offline["headrace"][-1]["output_tokens"]
    assert offline["config"]["enable_prefix_caching"] is False
    # Where the gap is: the worker's busy period and the client's / gateway's CPU seconds.
    assert re.search(r"worker busy period: 3 requests, \d+ tokens in [\d.]+ s", text), text
    assert re.search(
        r"HTTP run [\d.]+ s: client CPU [\d.]+ s, gateway process CPU [\d.]+ s", text
    ), text
    tl = json.loads((out / "w4gap_worker_timeline.json").read_text())
    assert tl["output_tokens"] == offline["headrace"][-1]["output_tokens"]
    assert "timeline" in offline  # offline ran with --profile, as the worker did
