"""The split-K W4A16 decode GEMV (cuda/int4_gemv.cu) for the rows layout: variants, the
per-shape rule that picks one, its launch, and the split workspace.

A variant is (ROWS, WK): each warp owns ROWS output channels, WK warps of the 8 in a block
split K for the same channels (so a block owns RB = ROWS * 8 / WK channels), and a grid
of `splits` blocks along y splits K again. Kernels are instantiated for x row counts
M_T in (1, 2, 4, 8); a launch takes any M <= M_T rows (M = 3 runs the M_T = 4 kernel).

The rule (`choose`), by reasoning until a GPU run says otherwise (scripts/bench_int4.py
prints the measured best per shape):
  1. splits: x's slice is staged in shared memory as fp32 plus two sums per 32 inputs
     (136 bytes per chunk and row), at most SMEM_MAX per block, so long K splits;
  2. among the variants instantiated for M_T and 1 to 4 times that many splits, in this
     order of importance: at most
     MAX_IDLE of the K threads idle in their last round; at least one block per SM; at
     most MAX_LOADS 16-byte weight loads per thread (8 a round are in flight); then the
     most channels per block (each block stages K x M x 2 bytes of x from L2: more
     channels amortize it), then the fewest splits, then the most warps along K.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cuda import compiler
from cuda.int4_args import ptr, weight_args

SOURCE_PATH = Path(__file__).with_name("int4_gemv.cu")
THREADS = 256  # SK_THREADS
WARPS = 8
CHUNK = 32  # inputs per 16-byte weight vector
SMEM_PER_CHUNK_ROW = 8 * 16 + 8  # 8 float4 of x + float2 (C, X)
# Dynamic shared memory a block may take: 48 KB (static + dynamic, without an opt-in
# attribute) less 1 KB for the kernel's static arrays (red, last: <= 516 bytes).
SMEM_MAX = 47 * 1024
MAX_LOADS = 16  # 16-byte weight loads per thread (two rounds of 8 in flight)
MAX_IDLE = 0.25
SMS = 132  # H200; `choose` takes the real count
M_TEMPLATES = (1, 2, 4, 8)
MAX_ROWS = 8  # x rows one launch takes
VARIANTS: dict[int, tuple[tuple[int, int], ...]] = {  # M_T -> (ROWS, WK), as the .cu has
    1: ((2, 8), (4, 8), (2, 4), (4, 4), (8, 4), (8, 2)),
    2: ((4, 4), (8, 4), (8, 2)),
    4: ((2, 4), (4, 4), (4, 8)),
    8: ((2, 4), (2, 8)),
}
# The split workspace: fp32 partials [splits, M, N] and one counter per channel tile.
PART_FLOATS = 4 << 20
COUNTERS = 1 << 16

_source: str | None = None
_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass(frozen=True)
class Plan:
    """One launch: kernel template, grid and split."""

    m_t: int
    rows: int
    wk: int
    splits: int
    chunks_per_split: int

    @property
    def name(self) -> str:
        return f"gemv_sk_m{self.m_t}_r{self.rows}_w{self.wk}"

    @property
    def rows_per_block(self) -> int:
        return self.rows * WARPS // self.wk

    def grid(self, n: int) -> tuple[int, int]:
        return (-(-n // self.rows_per_block), self.splits)

    def shmem(self, m: int) -> int:
        return m * self.chunks_per_split * SMEM_PER_CHUNK_ROW

    def fits(self, n: int, m: int) -> bool:
        """Whether the shared memory and the split workspace hold this launch."""
        if self.shmem(m) > SMEM_MAX:
            return False
        return self.splits == 1 or (
            self.splits * m * n <= PART_FLOATS and self.grid(n)[0] <= COUNTERS
        )


def m_template(m: int) -> int:
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"x rows {m} outside 1..{MAX_ROWS}")
    return next(t for t in M_TEMPLATES if t >= m)


def split_plan(n: int, k: int, m: int, rows: int, wk: int, splits: int = 0) -> Plan:
    """A plan for a given variant; splits 0: the fewest that fit shared memory."""
    auto = splits <= 0
    chunks = k // CHUNK
    splits = min(max(splits, 1), chunks)
    while True:
        per = -(-chunks // splits)
        plan = Plan(m_template(m), rows, wk, -(-chunks // per), per)  # no empty split
        if not auto or plan.shmem(m) <= SMEM_MAX or splits >= chunks:
            return plan
        splits += 1


@functools.lru_cache(maxsize=4096)  # decode calls it per layer and step (eager)
def choose(
    n: int, k: int, m: int, sms: int = SMS, variants: tuple[tuple[int, int], ...] = ()
) -> Plan:
    """The variant and split for y = x W^T with W [n, k] and x [m, k] (module docstring);
    `variants` limits the choice (the bench times each variant with its best split)."""
    fewest = split_plan(n, k, m, 1, 8).splits
    plans = {
        split_plan(n, k, m, rows, wk, splits)
        for splits in range(fewest, 4 * fewest + 1)
        for rows, wk in variants or VARIANTS[m_template(m)]
    }

    def rank(plan: Plan) -> tuple:
        per_thread = -(-plan.chunks_per_split // (32 * plan.wk))
        idle = 1 - plan.chunks_per_split / (32 * plan.wk * per_thread)  # in the last round
        return (
            plan.fits(n, m),
            idle <= MAX_IDLE,
            plan.grid(n)[0] * plan.splits >= sms,  # every SM gets a block
            plan.rows * per_thread <= MAX_LOADS,
            plan.rows_per_block,  # x staging (K x M x 2 bytes a block) amortized over more
            -plan.splits,
            plan.wk,
        )

    return max(plans, key=rank)


def source() -> str:
    global _source
    if _source is None:
        _source = compiler.read_source(SOURCE_PATH)  # pastes elem2_type.cuh
    return _source


def kernel_names(m_t: int) -> list[str]:
    """The kernels of the module for M_T rows (macro HR_SK_M)."""
    return [f"gemv_sk_m{m_t}_r{r}_w{w}" for r, w in VARIANTS[m_t]]


def module_defines(dtype: torch.dtype, m_t: int) -> dict[str, int | str]:
    return {"HR_BF16": 1 if dtype == torch.bfloat16 else 0, "HR_SK_M": m_t}


def workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partials, int32 zeroed counters) for split launches on `device`: made once,
    before CUDA graph capture (prepare_int4_layers), never freed or regrown, so a captured
    graph's pointers stay valid. One stream at a time may use it."""
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0": one workspace
        device = torch.device("cuda", torch.cuda.current_device())
    ws = _workspaces.get(device)
    if ws is None:
        part = torch.empty(PART_FLOATS, dtype=torch.float32, device=device)
        counters = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
        ws = _workspaces[device] = (part, counters)
    return ws


def launch_args(x: torch.Tensor, w: object, y: torch.Tensor, plan: Plan, ws: tuple) -> list:
    """The kernel's arguments, in HR_SK_ARGS order (w: an Int4Weight in the rows layout)."""
    part, counters = ws
    tail = [
        np.int32(w.group_size),  # type: ignore[attr-defined]
        np.int32(x.shape[0]),
        np.int32(plan.chunks_per_split),
        ptr(part),
        ptr(counters),
    ]
    return [*weight_args(x, w, y), *tail]


def _kernel(dtype: torch.dtype, plan: Plan) -> object:
    mod = compiler.load_module(source(), defines=module_defines(dtype, plan.m_t), name="int4_gemv")
    return mod.kernel(plan.name)


def forced_variant(text: str) -> tuple[int, int] | None:
    """HEADRACE_INT4_GEMV_VARIANT "r{ROWS}_w{WK}" (e.g. r8_w4): use that variant, with its
    best split, where the row count has it (to try a bench's best in W1 without a code
    change); "" : the rule."""
    if not text:
        return None
    m = re.fullmatch(r"r(\d+)_w(\d+)", text)
    variant = (int(m.group(1)), int(m.group(2))) if m else None
    if variant is None or not any(variant in vs for vs in VARIANTS.values()):
        known = sorted({f"r{r}_w{w}" for vs in VARIANTS.values() for r, w in vs})
        raise ValueError(f"HEADRACE_INT4_GEMV_VARIANT {text!r} is not one of {known}")
    return variant


FORCED = forced_variant(os.environ.get("HEADRACE_INT4_GEMV_VARIANT", ""))


def plan_for(m: int, w: object, device: torch.device) -> Plan:
    """The rule's plan for x of m rows times w (an Int4Weight) on `device`."""
    n, k = w.out_features, w.in_features  # type: ignore[attr-defined]
    if FORCED is not None and FORCED in VARIANTS[m_template(m)]:
        return choose(n, k, m, _sms(device), (FORCED,))
    return choose(n, k, m, _sms(device))


def gemv(x: torch.Tensor, w: object, y: torch.Tensor, plan: Plan) -> None:
    """y [M, N] = x [M, K] W^T for M <= 8 on the GPU; `plan` must fit (Plan.fits)."""
    n, m = w.out_features, x.shape[0]  # type: ignore[attr-defined]
    args = launch_args(x, w, y, plan, workspace(x.device))
    compiler.launch(_kernel(x.dtype, plan), plan.grid(n), THREADS, *args, shmem=plan.shmem(m))


_sms = compiler.num_sms  # a module name, so tests can fake the SM count
