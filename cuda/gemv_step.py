"""The decode step's GEMV, round 2 (cuda/gemv_step.cu): y = x' @ w^T (+ bias) (+ residual)
for M <= 8 rows of bf16/fp16, with optional prologues that fold the op before it in:

    gemv2(x, w, bias, residual)           x' = x                          x [M, K]
    gemv2_norm(h, nw, eps, w, ...)        x' = RMSNorm(h) * nw            h [M, K], M <= 4
    gemv2_silu(gate_up, w, ...)           x' = silu(gate) * up            gate_up [M, 2K]
    gemv2_norm_pair(h, nw, eps, w, ...)   silu(x' @ gate^T) * (x' @ up^T)  w = gate | up, M <= 4
                                          (x' = RMSNorm(h) * nw; y [M, N/2])

and, with `residual` [M, N], y = round(round(x' @ w^T + bias) + residual): the residual add of
the next add_rms_norm. The `*_ref` functions are the torch references (the rounding of
cuda/fused_ops.py's kernels and of cuda/gemv.py's fp32 sums).

The launch plan (`plan`, pure host logic, tested on CPU): one resident wave of 256-thread
blocks (SMs x blocks per SM, capped by the rows: R rows per warp), each warp looping over
its row groups; prologue kernels get M * K elements of dynamic shared memory (<= 48 KiB).
HEADRACE_PDL=1 launches them by Programmatic Dependent Launch (cuda/step_fusion.py pdl).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from cuda import compiler
from cuda.fused_ops import add_rms_norm_ref, silu_and_mul_ref
from cuda.step_fusion import pdl

SOURCE_PATH = Path(__file__).with_name("gemv_step.cu")
DTYPES = {torch.float16: 1, torch.bfloat16: 2}  # HR_DTYPE in the source
VEC = 8  # elements per 16-byte chunk
WARPS = 8
THREADS = WARPS * 32
MAX_ROWS = {"": 8, "norm": 4, "silu": 2, "norm_pair": 4}  # largest M per kernel kind
MAX_SHMEM = 48 * 1024  # dynamic shared memory without an opt-in attribute
# (R rows per warp, U chunks per row in flight per lane): 8 x 16-byte loads per lane.
DEFAULT_VARIANT = (2, 4)
VARIANTS = ((2, 4), (1, 8), (4, 2), (1, 4))  # what scripts/bench_gemv.py compares
# One row of x: one row per warp where the rows fit one resident wave (twice the warps of
# R = 2, so twice the bytes in flight: 8B o and down), else two. More rows of x keep R = 2:
# each weight chunk then serves M x chunks from L1 / shared memory, twice over.
M1_CANDIDATES = ((1, 8), (2, 4))


class Plan(NamedTuple):
    kernel: str
    grid: int
    block: int
    shmem: int


def kernel_name(prologue: str, m: int) -> str:
    return f"gemv2_{prologue}_m{m}" if prologue else f"gemv2_m{m}"


KERNELS = tuple(kernel_name(p, m) for p, top in MAX_ROWS.items() for m in range(1, top + 1))


def pick_variant(
    m: int, n: int, resident_warps: Callable[[tuple[int, int]], int]
) -> tuple[int, int]:
    """The variant for an [m, K] x [n, K]^T launch: the first M1_CANDIDATES entry whose row
    groups all fit one wave (resident_warps(v): warps of variant v resident on the card),
    else the default."""
    if m == 1:
        for v in M1_CANDIDATES:
            if -(-n // v[0]) <= resident_warps(v):
                return v
    return DEFAULT_VARIANT


def shmem_bytes(prologue: str, m: int, k: int, elem_bytes: int) -> int:
    """Dynamic shared memory of a launch: the prologue's M rows of x' (K wide)."""
    return m * k * elem_bytes if prologue else 0


def plan(
    prologue: str,
    m: int,
    n: int,
    k: int,
    elem_bytes: int,
    sms: int,
    blocks_per_sm: int,
    rows_per_warp: int = DEFAULT_VARIANT[0],
) -> Plan:
    """Grid: enough blocks for every warp to own R rows, at most one resident wave."""
    groups = -(-n // rows_per_warp)
    grid = max(1, min(-(-groups // WARPS), sms * max(blocks_per_sm, 1)))
    return Plan(kernel_name(prologue, m), grid, THREADS, shmem_bytes(prologue, m, k, elem_bytes))


def fits(prologue: str, m: int, n: int, k: int, elem_bytes: int) -> bool:
    """Sizes the kernels take (layouts aside)."""
    if not (1 <= m <= MAX_ROWS[prologue] and n >= 1 and k >= VEC and k % VEC == 0):
        return False
    if n >= 2**31 or m * n >= 2**31 or (prologue == "silu" and 2 * k >= 2**31):
        return False
    if prologue == "norm_pair" and n % 2:
        return False
    return shmem_bytes(prologue, m, k, elem_bytes) <= MAX_SHMEM


def _aligned_rows(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.stride(0) % VEC == 0 and t.data_ptr() % 16 == 0


def supported(
    prologue: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None,
) -> bool:
    """Shapes, dtypes and layouts a launch takes (device aside)."""
    if x.dim() != 2 or weight.dim() != 2 or x.dtype not in DTYPES or weight.dtype != x.dtype:
        return False
    m, kx = x.shape
    n, k = weight.shape
    if kx != (2 * k if prologue == "silu" else k) or not fits(prologue, m, n, k, x.element_size()):
        return False
    if not _aligned_rows(x) or not weight.is_contiguous() or weight.data_ptr() % 16:
        return False
    tensors = [x, weight]
    for t, shape in ((bias, (n,)), (norm_weight, (k,))):
        if t is not None:
            if t.shape != shape or t.dtype != x.dtype or not t.is_contiguous() or t.data_ptr() % 16:
                return False
            tensors.append(t)
    if prologue in ("norm", "norm_pair") and norm_weight is None:
        return False
    if residual is not None and prologue == "norm_pair":
        return False
    if residual is not None:
        if residual.shape != (m, n) or residual.dtype != x.dtype or residual.stride(1) != 1:
            return False
        tensors.append(residual)
    return len({t.device for t in tensors}) == 1


# --- references -------------------------------------------------------------------------------


def gemv2_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
) -> torch.Tensor:
    """fp32 products and sums, one rounding to x's dtype, then the residual add (rounded)."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return y if residual is None else y + residual


def gemv2_norm_ref(
    h: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    normed, _ = add_rms_norm_ref(h, None, norm_weight, eps)
    return gemv2_ref(normed, weight, bias, residual)


def gemv2_norm_pair_ref(
    h: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """silu_and_mul of the gate/up GEMV of RMSNorm(h): [M, N/2]."""
    return silu_and_mul_ref(gemv2_norm_ref(h, norm_weight, eps, weight, bias, None))


def gemv2_silu_ref(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    return gemv2_ref(silu_and_mul_ref(gate_up), weight, bias, residual)


# --- launches ---------------------------------------------------------------------------------


def launch_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    norm_weight: torch.Tensor | None,
    eps: float,
) -> tuple[object, ...]:
    """The kernel's parameter list (HR_GEMV2_ARGS), in order."""
    n, k = weight.shape
    return (
        x.data_ptr(),
        np.int64(x.stride(0)),
        weight.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        0 if residual is None else residual.data_ptr(),
        np.int64(0 if residual is None else residual.stride(0)),
        out.data_ptr(),
        np.int64(out.stride(0)),
        0 if norm_weight is None else norm_weight.data_ptr(),
        np.float32(eps),
        np.int32(n),
        np.int32(k),
    )


def source() -> str:
    return compiler.read_source(SOURCE_PATH)


def module_defines(dtype: torch.dtype, variant: tuple[int, int]) -> dict[str, int | str]:
    return {"HR_DTYPE": DTYPES[dtype], "HR_R": variant[0], "HR_U": variant[1]}


@functools.cache
def _sms(device: int) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


_occupancy: dict[tuple[object, ...], int] = {}


def _blocks_per_sm(kernel: object, key: tuple[object, ...], shmem: int) -> int:
    n = _occupancy.get(key)
    if n is None:
        n = _occupancy[key] = compiler.blocks_per_sm(kernel, THREADS, shmem)
    return n


def _kernel(prologue: str, m: int, dtype: torch.dtype, variant: tuple[int, int]) -> Any:
    mod = compiler.load_module(source(), defines=module_defines(dtype, variant), name="gemv_step")
    return mod.kernel(kernel_name(prologue, m))


_launches: dict[tuple[object, ...], tuple[Any, Plan, tuple[int, int]]] = {}


def _choose(
    prologue: str,
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    dev: int,
    variant: tuple[int, int] | None,
) -> tuple[Any, Plan, tuple[int, int]]:
    """(kernel, plan, variant) of a launch shape: pick_variant's variant where None."""
    elem = torch.empty((), dtype=dtype).element_size()
    shmem = shmem_bytes(prologue, m, k, elem)
    sms = _sms(dev)

    def bps(v: tuple[int, int]) -> int:
        key = (prologue, m, dtype, v, shmem, dev)
        return _blocks_per_sm(_kernel(prologue, m, dtype, v), key, shmem)

    if variant is None:  # the pair kernels run two rows per warp whatever the module's R
        pair = prologue == "norm_pair"
        variant = DEFAULT_VARIANT if pair else pick_variant(m, n, lambda v: sms * bps(v) * WARPS)
    rows = 2 if prologue == "norm_pair" else variant[0]
    p = plan(prologue, m, n, k, elem, sms, bps(variant), rows)
    return _kernel(prologue, m, dtype, variant), p, variant


def chosen_variant(prologue: str, m: int, n: int, k: int, dtype: torch.dtype) -> tuple[int, int]:
    """The variant run() launches for this shape on the current device (for the bench)."""
    dev = torch.cuda.current_device()
    return _choose(prologue, m, n, k, dtype, dev, None)[2]


def run(
    prologue: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    out: torch.Tensor | None = None,
    variant: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One launch on CUDA tensors that `supported` takes (the caller checks); variant None:
    pick_variant's."""
    m = x.shape[0]
    n, k = weight.shape
    if out is None:
        width = n // 2 if prologue == "norm_pair" else n
        out = torch.empty((m, width), dtype=x.dtype, device=x.device)
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    key = (prologue, m, n, k, x.dtype, dev, variant)
    hit = _launches.get(key)
    if hit is None:
        hit = _launches[key] = _choose(prologue, m, n, k, x.dtype, dev, variant)
    kernel, p, _ = hit
    args = launch_args(x, weight, bias, residual, out, norm_weight, eps)
    compiler.launch(kernel, (p.grid,), p.block, *args, shmem=p.shmem, pdl=pdl())
    return out


def gemv2(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    variant: tuple[int, int] | None = None,
) -> torch.Tensor:
    """x @ w^T (+ bias) (+ residual): the kernel where it applies, else the reference."""
    if x.is_cuda and supported("", x, weight, bias, residual):
        return run("", x, weight, bias, residual, out=out, variant=variant)
    y = gemv2_ref(x, weight, bias, residual)
    return y if out is None else out.copy_(y)


def gemv2_norm(
    h: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm(h) * norm_weight @ w^T (+ bias) (+ residual), one launch on the GPU."""
    if h.is_cuda and supported("norm", h, weight, bias, residual, norm_weight):
        return run("norm", h, weight, bias, residual, norm_weight, eps)
    return gemv2_norm_ref(h, norm_weight, eps, weight, bias, residual)


def gemv2_norm_pair(
    h: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu_and_mul(RMSNorm(h) * norm_weight @ w^T (+ bias)) for w = gate | up, one launch."""
    if h.is_cuda and supported("norm_pair", h, weight, bias, None, norm_weight):
        return run("norm_pair", h, weight, bias, None, norm_weight, eps)
    return gemv2_norm_pair_ref(h, norm_weight, eps, weight, bias)


def gemv2_silu(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """(silu(gate) * up) @ w^T (+ bias) (+ residual), one launch on the GPU."""
    if gate_up.is_cuda and supported("silu", gate_up, weight, bias, residual):
        return run("silu", gate_up, weight, bias, residual)
    return gemv2_silu_ref(gate_up, weight, bias, residual)
