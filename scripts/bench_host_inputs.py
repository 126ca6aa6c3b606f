"""Host CPU time per decode step of preparing a CUDA graph's inputs: the default path
(persistent input batch, then pad_inputs into the graph's staging buffers) against
HEADRACE_STEP_INPUTS=numba (the device builder, then the diff of the device state).

No GPU and no model: the engine's scheduler and KV cache with stub tokens (as
scripts/bench_scheduler.py), `--batch` requests of `--context` prompt tokens decoding.
Not counted: the default path's 6 host-to-device copies per step (torch calls of a few us
each on a GPU) and the numba path's one copy of the input ids (none with async
scheduling's fed ids). Counted: the numba path's diff scatter on the steps whose diff is
not empty (`scatter_steps`), run here on CPU tensors (a CPU index_put, ~30 us at batch 256;
on a GPU it is a pinned copy and one index_put launch).

    PYTHONPATH=. NUMBA_ENABLE_CUDASIM=1 python scripts/bench_host_inputs.py --batch 1 64 256
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from scripts.bench_scheduler import decoding_scheduler
from worker.input_batch import PaddedInputs, pad_inputs
from worker.persistent_batch import PersistentInputBatch

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # the state's kernels are not launched


def padded(n: int, width: int) -> PaddedInputs:
    z64, z32 = np.zeros((3, n), dtype=np.int64), np.zeros(2 * n + 1, dtype=np.int32)
    return PaddedInputs(
        z64[0], z64[1], z64[2], z32[: n + 1], z32[n + 1 :], np.zeros((n, width), np.int32)
    )


def run(batch: int, context: int, steps: int, mode: str) -> dict:
    from worker.device_inputs import DeviceInputBatch, DeviceStepState

    sched = decoding_scheduler(batch, context, caching=True)
    width = -(-4096 // 16)
    dst = padded(batch, width)
    persistent = PersistentInputBatch()
    state = DeviceStepState(batch, width, 16, torch.device("cpu"))
    device = DeviceInputBatch(state, persistent.build, lambda: True)
    scatters = 0
    real = state._scatter

    def counted(idx: list, val: list) -> None:
        nonlocal scatters
        scatters += bool(sum(len(i) for i in idx))
        real(idx, val)

    state._scatter = counted  # type: ignore[method-assign]
    spent: list[float] = []
    for _ in range(steps):
        out = sched.schedule()
        t0 = time.perf_counter()
        if mode == "host":
            pad_inputs(persistent.build(out), dst, batch, batch)
        else:
            host = device.build(out)
            assert host.device is not None
            state.apply(host.device)
            dst.input_ids[:batch] = host.input_ids
        spent.append(time.perf_counter() - t0)  # wall: process time ticks too coarsely
        sched.update(out, [[7] for _ in out.scheduled])
    return dict(
        batch=batch,
        mode=mode,
        median_us=float(np.median(spent)) * 1e6,
        mean_us=float(np.mean(spent)) * 1e6,  # with the garbage collector's pauses
        scatter_steps=scatters,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)  # CPU time of this thread's work, not of idle pool threads
    rows = []
    for batch in args.batch:
        for _ in range(args.repeats):  # alternated: the machine is shared
            for mode in ("host", "numba"):
                row = run(batch, args.context, args.steps, mode)
                rows.append(row)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
