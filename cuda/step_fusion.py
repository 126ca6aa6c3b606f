"""HEADRACE_STEP_FUSION=0 runs the decode step without issue 11's fusions, to compare or to
fall back: rotary and the KV write as two launches (not cuda/kv_write_rotary.py's one),
torch's argmax (not cuda/argmax.py's), no greedy decode graphs (worker/cuda_graphs.py), and
none of the GEMV fusions below. HEADRACE_GEMV (cuda/gemv.py) switches the small-M GEMV on
its own. Read per call: tests and benchmarks switch them in one process.

HEADRACE_GEMV_FUSION picks the GEMV fusions of the batch-1 step (worker/models/fused_step.py,
cuda/gemv_step.cu), a comma list of (default: all of them; `none` for none):

    norm      the RMSNorm folded into the prologue of the q/k/v (and gate/up) GEMV
    silu      SiLU-and-mul folded into the down projection GEMV's input
    residual  the residual add folded into the o / down GEMV's epilogue
"""

from __future__ import annotations

import os

GEMV_FUSIONS = ("norm", "silu", "residual")


def pdl() -> bool:
    """HEADRACE_PDL=1 (opt-in): cuda/gemv_step.cu's GEMVs start by Programmatic Dependent
    Launch, their weight prefetch overlapping the previous kernel's tail."""
    value = os.environ.get("HEADRACE_PDL", "0") or "0"
    if value not in ("0", "1"):
        raise ValueError(f"HEADRACE_PDL must be 0 or 1, got {value!r}")
    return value == "1"


def step_fusion() -> bool:
    value = os.environ.get("HEADRACE_STEP_FUSION", "1") or "1"
    if value not in ("0", "1"):
        raise ValueError(f"HEADRACE_STEP_FUSION must be 0 or 1, got {value!r}")
    return value == "1"


def gemv_fusions() -> frozenset[str]:
    """The GEMV fusions on (none under HEADRACE_STEP_FUSION=0), validated."""
    value = (os.environ.get("HEADRACE_GEMV_FUSION", "all") or "all").strip()
    if value == "all":
        parts = frozenset(GEMV_FUSIONS)
    elif value == "none":
        parts = frozenset()
    else:
        parts = frozenset(p.strip() for p in value.split(","))
        unknown = sorted(parts - set(GEMV_FUSIONS))
        if unknown or not parts:
            raise ValueError(
                f"HEADRACE_GEMV_FUSION must be all, none or a comma list of "
                f"{', '.join(GEMV_FUSIONS)}, got {value!r}"
            )
    return parts if step_fusion() else frozenset()
