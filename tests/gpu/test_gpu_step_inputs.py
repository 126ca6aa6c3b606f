"""The Numba step-input kernels on the GPU: against the numpy reference, on torch's stream,
and replayed from a CUDA graph with new inputs (the graph must not bake in this step's
lengths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cuda.step_inputs import StepInputArrays, launch_step_inputs, step_inputs_ref
from tests.test_step_inputs import random_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def device_step(step: dict) -> dict:
    out = dict(step)
    for k in ("rows", "num_computed", "num_new", "token_ids", "block_tables"):
        out[k] = torch.from_numpy(step[k]).cuda()
    return out


def poisoned(max_reqs: int, max_tokens: int) -> StepInputArrays:
    def full(n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((n,), -7, dtype=dtype, device="cuda")

    return StepInputArrays(
        full(max_reqs + 1, torch.int32),
        full(max_reqs, torch.int32),
        full(max_tokens, torch.int64),
        full(max_tokens, torch.int64),
        full(max_tokens, torch.int64),
    )


def check(out: StepInputArrays, step: dict, max_reqs: int, max_tokens: int) -> None:
    ref = step_inputs_ref(**step, max_reqs=max_reqs, max_tokens=max_tokens)
    total = int(ref.query_start_loc[len(step["rows"])])
    np.testing.assert_array_equal(out.query_start_loc.cpu().numpy(), ref.query_start_loc)
    np.testing.assert_array_equal(out.seq_lens.cpu().numpy(), ref.seq_lens)
    np.testing.assert_array_equal(out.positions.cpu().numpy()[:total], ref.positions[:total])
    np.testing.assert_array_equal(out.input_ids.cpu().numpy()[:total], ref.input_ids[:total])
    np.testing.assert_array_equal(out.slot_mapping.cpu().numpy(), ref.slot_mapping)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_reqs", [1, 7, 300, 1024])
def test_kernels_match_reference_on_gpu(seed: int, max_reqs: int) -> None:
    step = random_step(seed, max_reqs, block_size=16)
    max_tokens = int(step["num_new"].sum()) + 9
    out = poisoned(max_reqs, max_tokens)
    stream = torch.cuda.current_stream().cuda_stream
    launch_step_inputs(**device_step(step), out=out, num_reqs=len(step["rows"]), stream=stream)
    torch.cuda.synchronize()
    check(out, step, max_reqs, max_tokens)


def test_graph_replay_with_new_inputs_equals_reference() -> None:
    # Decode steps: one token per request, as the decode graphs see them.
    max_reqs, max_tokens = 64, 64
    steps = []
    for seed in range(3):
        step = random_step(seed, max_reqs, block_size=16)
        step["num_new"][:] = 1
        step["rows"] = step["rows"][: min(len(step["rows"]), 48)]
        for k in ("num_computed", "num_new"):
            step[k] = step[k][: len(step["rows"])]
        steps.append(step)
    num_reqs = 48
    # Static inputs sized for the graph; every step is padded to num_reqs requests.
    static = device_step(steps[0])
    for k in ("rows", "num_computed", "num_new"):
        static[k] = torch.zeros(num_reqs, dtype=torch.int32, device="cuda")
    out = poisoned(max_reqs, max_tokens)

    def fill(step: dict) -> dict:
        b = len(step["rows"])
        for k in ("rows", "num_computed", "num_new"):
            static[k].zero_()
            static[k][:b] = torch.from_numpy(step[k])
        static["token_ids"].copy_(torch.from_numpy(step["token_ids"]))
        static["block_tables"].copy_(torch.from_numpy(step["block_tables"]))
        padded = dict(step)
        for k in ("rows", "num_computed", "num_new"):
            padded[k] = static[k].cpu().numpy()
        return padded

    fill(steps[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation) outside the capture
        launch_step_inputs(**static, out=out, num_reqs=num_reqs, stream=side.cuda_stream)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch_step_inputs(
            **static,
            out=out,
            num_reqs=num_reqs,
            stream=torch.cuda.current_stream().cuda_stream,
        )
    for step in steps:
        padded = fill(step)
        graph.replay()
        torch.cuda.synchronize()
        check(out, padded, max_reqs, max_tokens)
