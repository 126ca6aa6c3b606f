"""CPU cost of one kernel launch through cuda.core (what every eager step pays per kernel).

Measured on the H100 machine (2026-11-27): cuda.core 21.7 us per launch; a ctypes call of
the driver's cuLaunchKernel was slower (24 us with the CUkernel handle, 35 us after
resolving a CUfunction), so launches stay on cuda.core.

PYTHONPATH=. python scripts/bench_launch.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from cuda import compiler
from cuda.kv_write_kernel import SOURCE


def main() -> None:
    kernel = compiler.load_module(SOURCE, name="write_kv").kernel("write_kv")
    k = torch.zeros(1, 8, 128, dtype=torch.bfloat16, device="cuda")
    cache = torch.zeros(2, 4, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    slots = torch.full((1,), -1, dtype=torch.int64, device="cuda")
    args = (
        k.data_ptr(),
        np.int64(128),
        k.data_ptr(),
        np.int64(128),
        cache.data_ptr(),
        np.int64(4 * 16 * 128),
        slots.data_ptr(),
        np.int32(128),
    )

    def core() -> None:
        from cuda.core import LaunchConfig
        from cuda.core import launch as cc_launch

        cc_launch(compiler.current_stream(), LaunchConfig(grid=(1,), block=128), kernel, *args)

    for name, fn in [("cuda.core", core)]:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        n = 2000
        t = time.perf_counter()
        for _ in range(n):
            fn()
        cpu = (time.perf_counter() - t) / n * 1e6
        torch.cuda.synchronize()
        print(f"{name:20s} {cpu:7.1f} us CPU per launch")


if __name__ == "__main__":
    main()
