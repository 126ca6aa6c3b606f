"""Tensor parallel on GPUs (NCCL): TP = 2 gives TP = 1's greedy tokens, with CUDA graphs
capturing the all-reduces, eagerly, and with async scheduling. Needs 2 GPUs.

Each TP run is its own process (one torch.distributed group per process): the leader is
`tests/gpu/test_gpu_tp.py` run as a script, printing what tests.gpu.helpers.generate
returns as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.gpu.helpers import generate
from tests.test_golden import check_logprobs_close, prompts_of_different_lengths
from tests.tiny_models import tiny_model_hd64

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    # Hardware, not a missing dependency: a one-GPU machine cannot run a group of two.
    pytest.skip("tensor parallel needs 2 CUDA GPUs", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]


def generate_tp(path: Path, prompts: list[list[int]], **engine_args: Any) -> dict:
    """tests.gpu.helpers.generate in a fresh process (it leads the group's followers)."""
    job = json.dumps({"path": str(path), "prompts": prompts, "args": engine_args})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, __file__, job], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.splitlines()[-1])


def lists(out: list) -> list:
    """Generated.out as JSON gives logprob dicts string keys: back to int token ids."""
    return [(t, [{int(k): v for k, v in lp.items()} for lp in lps]) for t, lps in out]


def test_stories260k_tp2_equals_tp1_float32(stories_path: Path) -> None:
    from gateway.tokenizer import load_tokenizer

    tok = load_tokenizer(str(stories_path))
    prompts = [tok.encode(t) for t in ["Once upon a time", "Lily", "The dog ran to the park and"]]
    args = dict(device="cuda", dtype="float32", max_num_seqs=8)
    one = generate(stories_path, prompts, **args)
    two = generate_tp(stories_path, prompts, tensor_parallel_size=2, **args)
    assert [t for t, _ in lists(two["out"])] == [t for t, _ in one.out]


@pytest.mark.parametrize("mode", ["graphs", "eager", "async"])
def test_tp2_equals_tp1_bf16(tmp_path: Path, stories_path: Path, mode: str) -> None:
    path = tiny_model_hd64(tmp_path, stories_path)  # 4 heads, 2 KV heads: one per rank
    prompts = prompts_of_different_lengths()
    args: dict[str, Any] = dict(device="cuda", dtype="bfloat16", max_num_seqs=16)
    args |= {"enforce_eager": mode == "eager", "async_scheduling": mode == "async"}
    one = generate(path, prompts, max_tokens=64, **args)
    two = generate_tp(path, prompts, tensor_parallel_size=2, max_tokens=64, **args)
    # The sums of the all-reduces are ordered differently than one GPU's GEMM: near-ties
    # may flip, logprobs agree within bf16 rounding.
    check_logprobs_close(lists(two["out"]), one.out, f"tp2-{mode}", atol=5e-2)
    if mode != "eager":
        assert two["graphs"] and sum(two["replays"].values()) > 0  # NCCL inside the graphs


def _run(job: str) -> None:
    spec = json.loads(job)
    args = spec["args"]
    max_tokens = args.pop("max_tokens", 24)
    g = generate(spec["path"], spec["prompts"], max_tokens=max_tokens, **args)
    print(json.dumps({"out": g.out, "graphs": g.graphs, "replays": g.replays}))


if __name__ == "__main__":
    _run(sys.argv[1])
