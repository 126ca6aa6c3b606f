"""HEADRACE_STEP_FUSION=0 runs the decode step without issue 11's fusions, to compare or to
fall back: rotary and the KV write as two launches (not cuda/kv_write_rotary.py's one),
torch's argmax (not cuda/argmax.py's), and no greedy decode graphs (worker/cuda_graphs.py).
HEADRACE_GEMV (cuda/gemv.py) switches the small-M GEMV on its own. Read per call: tests and
benchmarks switch it in one process.
"""

from __future__ import annotations

import os


def step_fusion() -> bool:
    value = os.environ.get("HEADRACE_STEP_FUSION", "1") or "1"
    if value not in ("0", "1"):
        raise ValueError(f"HEADRACE_STEP_FUSION must be 0 or 1, got {value!r}")
    return value == "1"
