"""Large batches on the GPU (issue 13): the device's batch defaults, CUDA graphs past 512
rows (worker/cuda_graphs.py buckets up to 1024) and the decode workspace's split bound
(worker/decode_workspace.py), against eager steps of the same engine."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.helpers import generate
from tests.test_golden import check_logprobs_close
from tests.tiny_models import tiny_model_hd64

pytestmark = pytest.mark.gpu


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    return [[1, *torch.randint(3, 512, (k,), generator=g).tolist()] for k in lengths]


def test_default_batch_limits_follow_the_card() -> None:
    from worker.batch_defaults import device_batch_defaults

    d = device_batch_defaults(torch.device("cuda"), "offline")
    props = torch.cuda.get_device_properties(0)
    large = props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower()
    assert (d.max_num_seqs, d.max_num_batched_tokens) == ((1024, 16384) if large else (256, 8192))


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_graphs_past_512_rows_equal_eager(tmp_path, stories_path, kv_cache_dtype) -> None:
    path = tiny_model_hd64(tmp_path, stories_path)
    prompts = _prompts(int(torch.randint(600, 1000, ()).item()), seed=3)
    args = dict(
        device="cuda",
        dtype="bfloat16",
        max_num_seqs=1024,
        max_model_len=256,
        kv_cache_dtype=kv_cache_dtype,
        max_num_batched_tokens=16384,  # every prompt prefilled in one step: decodes of > 512
    )
    eager = generate(path, prompts, max_tokens=12, enforce_eager=True, **args)
    graphed = generate(path, prompts, max_tokens=12, **args)
    assert not eager.graphs and graphed.graphs
    assert graphed.replays[1] >= 10  # the decode steps of all the rows replayed a graph
    check_logprobs_close(graphed.out, eager.out, f"large-batch-{kv_cache_dtype}", atol=2e-2)
