"""Host-to-device copies of a step's sampling inputs do not wait for queued GPU work.

A pageable copy makes the host wait for every kernel on the stream; under async scheduling
that is the in-flight forward, and the GPU then idles while the host schedules the next
step (the W3 timeline's eager mixed steps spent ~300 ms of host time in `sample`). A long
sleep kernel stands in for the forward: what is built behind it must return at once.
"""

from __future__ import annotations

import time

import pytest
import torch

from ipc.messages import SamplingParams
from worker.device_copy import host_tensor
from worker.sampler import Sampler, SamplingBatch
from worker.sampling_tensors import row_params

pytestmark = pytest.mark.gpu

SLEEP_CYCLES = 2_000_000_000  # ~1 s at the H200's ~2 GHz
HOST_BOUND_S = 0.25  # far below the queued second; far above a few small copies


def _params(n: int) -> list[SamplingParams]:
    return [
        SamplingParams(
            temperature=0.0 if i % 5 == 0 else 0.7,
            top_p=0.9 if i % 2 else 1.0,
            top_k=20 if i % 3 == 0 else 0,
            min_p=0.05 if i % 4 == 0 else 0.0,
            seed=i if i % 6 == 0 else None,
            repetition_penalty=1.1 if i % 7 == 0 else 1.0,
            frequency_penalty=0.2 if i % 8 == 0 else 0.0,
            max_tokens=16,
        )
        for i in range(n)
    ]


def _behind_a_long_kernel(fn):  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    t0 = time.perf_counter()
    out = fn()
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    return out, host_s


def test_host_tensor_returns_before_queued_kernels_finish() -> None:
    dev = torch.device("cuda")
    values = list(range(50_000))
    x, host_s = _behind_a_long_kernel(lambda: host_tensor(values, torch.int64, dev))
    assert host_s < HOST_BOUND_S, f"host_tensor waited {host_s:.3f} s for the queued kernel"
    assert x.device.type == "cuda" and x.cpu().tolist() == values


def test_row_params_build_without_a_host_sync() -> None:
    dev = torch.device("cuda")
    params = _params(256)
    rows, host_s = _behind_a_long_kernel(lambda: row_params(params, 32_000, [2], dev))
    assert host_s < HOST_BOUND_S, f"row_params waited {host_s:.3f} s"
    ref = row_params(params, 32_000, [2], torch.device("cpu"))
    assert torch.equal(rows.temperatures.cpu(), ref.temperatures)
    assert torch.equal(rows.top_k_tensor.cpu(), ref.top_k_tensor)
    assert rows.top_p is not None and ref.top_p is not None
    assert torch.equal(rows.top_p.cpu(), ref.top_p)


def test_sampler_call_queues_without_waiting() -> None:
    """The whole draw (filters, penalties, seeded rows) is queued, not waited for."""
    dev = torch.device("cuda")
    vocab, n = 32_000, 128
    params = _params(n)
    gen = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(n, vocab, device=dev, generator=gen)
    prompts = [[(7 * i + j) % vocab for j in range(40)] for i in range(n)]
    outputs = [[(3 * i + j) % vocab for j in range(i % 9)] for i in range(n)]
    batch = SamplingBatch(params, prompts, outputs)
    sampler = Sampler(vocab, {2})
    sampler(logits, batch)  # warm up: allocator, kernels
    out, host_s = _behind_a_long_kernel(lambda: sampler(logits, batch))
    assert host_s < HOST_BOUND_S, f"the sampler waited {host_s:.3f} s for queued work"
    tokens = out.token_ids.cpu()
    assert tokens.shape == (n,) and bool(((tokens >= 0) & (tokens < vocab)).all())
