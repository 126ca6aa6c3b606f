"""Fused elementwise ops of a decoder layer: add + RMSNorm, rotary embedding, SiLU-and-mul.

Each op has a pure-torch reference (`*_ref`, the model's own torch code) and a dispatcher:
CUDA tensors of fp32/fp16/bf16 go to one NVRTC kernel (cuda/fused_ops.cu) launched on
torch's current stream, with no host sync, so it can be captured in a CUDA graph; CPU
tensors and layouts the kernels do not take go to the reference. The kernels round exactly
where the references do, so results match to the last bit up to the order of the RMSNorm
sum of squares.

Layouts::

    add_rms_norm   x, residual [T, H] (rows stride(1) == 1, any stride(0)), weight [H]
    rotary         q [T, Hq, D], k [T, Hkv, D]: views into a fused qkv row, stride(2) == 1
                   cos_sin [max_pos, R] fp32 = [cos(pos * inv_freq) | sin(pos * inv_freq)],
                   R <= D: the first R dims of each head rotate (R < D: partial rotary)
    silu_and_mul   x [T, 2I] = [gate | up] -> [T, I]
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cuda import compiler

SOURCE_PATH = Path(__file__).with_name("fused_ops.cu")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # HR_DTYPE in the source
KERNELS = (
    "add_rms_norm_vec",
    "add_rms_norm_scalar",
    "rotary",
    "silu_and_mul_vec",
    "silu_and_mul_scalar",
    "rotary_kv_write",  # cuda/kv_write_rotary.py
)
SILU_BLOCK = 256
ROTARY_BLOCK = 256  # threads a block at most (fused_ops.cu ROTARY_MAX_BLOCK)
ROTARY_HEADS = 4  # heads a thread at large T (fused_ops.cu HEAD_BATCH)
ROTARY_FILL = 1 << 17  # pair groups of a launch from which that fills an H200 (132 SMs)
MAX_GRID_Y = 65535


# --- references (the model's torch code) ---------------------------------------------------


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual), rounded as the model rounds."""
    if residual is not None:
        x = x + residual
    residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual


def rotary_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """Rotate-half rotary embedding of the first R dims of q and k, in place (R = the
    table's width; R < D is partial rotary, the other dims pass through)."""
    rot = cos_sin.shape[1]
    cos, sin = cos_sin[positions].chunk(2, dim=-1)  # [T, R/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (q, k):
        x1, x2 = x[..., :rot].float().chunk(2, dim=-1)
        x[..., :rot] = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] on the last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# --- which kernel takes which tensors (device-independent, so CPU tests can check it) ----


def _rows_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _vec(t: torch.Tensor) -> int:
    """Elements of t per 16-byte vector."""
    return 16 // t.element_size()


def norm_kernel(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> str | None:
    """The kernel for these tensors, or None where only the reference takes them."""
    if x.dtype not in DTYPES or x.dim() != 2 or x.numel() == 0:
        return None
    if weight.dtype != x.dtype or weight.shape != (x.shape[1],) or not weight.is_contiguous():
        return None
    rows = [x] if residual is None else [x, residual]
    if residual is not None and (residual.dtype != x.dtype or residual.shape != x.shape):
        return None
    if any(t.stride(1) != 1 for t in rows) or x.shape[0] >= 2**31:
        return None
    if any(t.device != x.device for t in [*rows, weight]):
        return None
    vec = (
        x.shape[1] % _vec(x) == 0
        and weight.data_ptr() % 16 == 0
        and all(_rows_aligned(t) for t in rows)
    )
    return "add_rms_norm_vec" if vec else "add_rms_norm_scalar"


def rotary_supported(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> bool:
    """Whether the rotary kernel takes these tensors (positions of any integer dtype)."""
    if q.dtype not in DTYPES or k.dtype != q.dtype or q.dim() != 3 or k.dim() != 3:
        return False
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or positions.shape != (t,) or t == 0:
        return False
    if d % 2 or d // 2 > 1024 or not 0 < hq + k.shape[1] <= MAX_GRID_Y or t >= 2**31:
        return False
    if q.stride(2) != 1 or k.stride(2) != 1:
        return False
    if any(u.device != q.device for u in (k, positions, cos_sin)):
        return False
    if positions.dtype.is_floating_point or positions.dtype.is_complex:
        return False
    return (
        cos_sin.dtype == torch.float32
        and cos_sin.dim() == 2
        and 0 < cos_sin.shape[1] <= d
        and cos_sin.shape[1] % 2 == 0
        and cos_sin.stride(1) == 1
    )


def silu_kernel(x: torch.Tensor) -> str | None:
    """The kernel for x, or None where only the reference takes it."""
    if x.dtype not in DTYPES or x.dim() != 2 or x.shape[1] % 2 or x.numel() == 0:
        return None
    if x.stride(1) != 1 or x.shape[0] >= 2**31:
        return None
    inter = x.shape[1] // 2
    vec = inter % _vec(x) == 0 and _rows_aligned(x)
    units = inter // _vec(x) if vec else inter
    if (units + SILU_BLOCK - 1) // SILU_BLOCK > MAX_GRID_Y:
        return None
    return "silu_and_mul_vec" if vec else "silu_and_mul_scalar"


# --- compilation -----------------------------------------------------------------------------


def source() -> str:
    return compiler.read_source(SOURCE_PATH)


def module_defines(dtype: torch.dtype) -> dict[str, int | str]:
    return {"HR_DTYPE": DTYPES[dtype]}


def _kernel(dtype: torch.dtype, name: str) -> object:
    mod = compiler.load_module(source(), defines=module_defines(dtype), name="fused_ops")
    return mod.kernel(name)


def _warp_round(n: int) -> int:
    return (n + 31) // 32 * 32


# --- launches: (kernel, grid, block, args) from tensors, without touching a device --------

Launch = tuple[str, tuple[int, ...], int, tuple[object, ...]]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def norm_launch(
    name: str,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    res_out: torch.Tensor | None,
) -> Launch:
    """add_rms_norm_{vec,scalar}; res_out is None exactly when residual is."""
    num_tokens, hidden = x.shape
    units = hidden // _vec(x) if name == "add_rms_norm_vec" else hidden
    args = (
        x.data_ptr(),
        np.int64(x.stride(0)),
        _ptr(residual),
        np.int64(0 if residual is None else residual.stride(0)),
        weight.data_ptr(),
        out.data_ptr(),
        _ptr(res_out),
        np.int32(units),
        np.float32(eps),
    )
    return name, (num_tokens,), min(1024, _warp_round(units)), args


def rotary_launch(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> Launch:
    """rotary; positions int64 and contiguous. Rotates the first cos_sin.shape[1] dims."""
    hkv = k.shape[1]
    half = cos_sin.shape[1] // 2
    vp = rotary_pairs_per_thread(half, q, k, cos_sin)
    grid, block = rotary_geometry(q.shape[0], q.shape[1] + hkv, half, vp)
    args = (*rotary_qk_args(positions, q, k), np.int32(hkv), *rotary_table_args(cos_sin))
    return "rotary", grid, block, args


def rotary_pairs_per_thread(
    half: int,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin: torch.Tensor,
    v: torch.Tensor | None = None,
    kv_cache: torch.Tensor | None = None,
) -> int:
    """The pairs a thread of the rotary kernels rotates per access (VP), as the kernels'
    `rotary_fits` picks it: 16 bytes of elements where half, the rows' strides and pointers
    (and the cache's head_dim, v_off) allow it, else 2, else 1."""
    rows = [q, k] if v is None else [q, k, v]
    for vp in (_vec(q), 2):
        table = min(vp, 4)
        ok = (
            half % vp == 0
            and all(_elems_fit(t.data_ptr(), t.stride(0), t.stride(1), vp, t) for t in rows)
            and cos_sin.data_ptr() % (4 * table) == 0
            and cos_sin.stride(0) % table == 0
        )
        if kv_cache is not None:
            v_off = kv_cache.stride(0)
            ok = ok and q.shape[2] % vp == 0 and _elems_fit(kv_cache.data_ptr(), v_off, 0, vp, q)
        if ok:
            return vp
    return 1


def _elems_fit(ptr: int, a: int, b: int, n: int, like: torch.Tensor) -> bool:
    return ptr % (n * like.element_size()) == 0 and a % n == 0 and b % n == 0


def rotary_geometry(num_tokens: int, heads: int, half: int, vp: int) -> tuple[tuple[int, int], int]:
    """(grid, block) of the rotary kernels: grid (T, head blocks); a block's threads are
    head slots x pair groups (half / vp threads a head), each thread rotating its pairs in
    `ROTARY_HEADS` heads at large T (one batch of loads) and in one head where a launch
    has too few pair groups to fill the GPU that way."""
    groups = -(-half // vp)
    big = num_tokens * heads * groups >= ROTARY_FILL
    slots = -(-heads // (ROTARY_HEADS if big else 1))  # head slots a token
    if groups > ROTARY_BLOCK:  # a head wider than a block: the kernel loops over groups
        return (num_tokens, slots), ROTARY_BLOCK
    y = -(-slots * groups // ROTARY_BLOCK)
    per_block = -(-slots // y)
    unit = 32 // math.gcd(groups, 32)  # slots that make a whole number of warps
    if -(-per_block // unit) * unit * groups <= ROTARY_BLOCK:
        per_block = -(-per_block // unit) * unit
    return (num_tokens, -(-slots // per_block)), per_block * groups


def rotary_qk_args(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple:
    """The leading arguments of the rotary kernels (rotary, rotary_kv_write): positions,
    then q and k with their token and head strides."""
    return (
        positions.data_ptr(),
        q.data_ptr(),
        np.int64(q.stride(0)),
        np.int64(q.stride(1)),
        np.int32(q.shape[1]),
        k.data_ptr(),
        np.int64(k.stride(0)),
        np.int64(k.stride(1)),
    )


def rotary_table_args(cos_sin: torch.Tensor) -> tuple:
    """The trailing arguments of the rotary kernels: the cos | sin table and half its width."""
    return (
        cos_sin.data_ptr(),
        np.int64(cos_sin.stride(0)),
        np.int64(cos_sin.shape[0]),
        np.int32(cos_sin.shape[1] // 2),
    )


def silu_launch(name: str, x: torch.Tensor, out: torch.Tensor) -> Launch:
    """silu_and_mul_{vec,scalar}."""
    inter = x.shape[1] // 2
    units = inter // _vec(x) if name == "silu_and_mul_vec" else inter
    args = (x.data_ptr(), np.int64(x.stride(0)), out.data_ptr(), np.int32(units))
    grid = (x.shape[0], (units + SILU_BLOCK - 1) // SILU_BLOCK)
    return name, grid, SILU_BLOCK, args


def _launch(dtype: torch.dtype, launch: Launch) -> None:
    name, grid, block, args = launch
    compiler.launch(_kernel(dtype, name), grid, block, *args)


# --- dispatchers -----------------------------------------------------------------------------


def add_rms_norm(
    x: torch.Tensor,  # [T, H]
    residual: torch.Tensor | None,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed [T, H], new residual [T, H]); without a residual the new residual is x."""
    name = norm_kernel(x, residual, weight) if x.is_cuda else None
    if name is None:
        return add_rms_norm_ref(x, residual, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = None if residual is None else torch.empty_like(out)
    _launch(x.dtype, norm_launch(name, x, residual, weight, eps, out, res_out))
    return out, x if res_out is None else res_out


def rotary(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    cos_sin: torch.Tensor,  # [max_pos, D] fp32
) -> None:
    """Rotate q and k in place. On the GPU, tokens whose position is outside the table are
    left unrotated (the reference raises)."""
    if not (q.is_cuda and rotary_supported(positions, q, k, cos_sin)):
        rotary_ref(positions, q, k, cos_sin)
        return
    if positions.dtype != torch.int64 or not positions.is_contiguous():
        positions = positions.to(torch.int64).contiguous()
    _launch(q.dtype, rotary_launch(positions, q, k, cos_sin))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    """silu(x[:, :I]) * x[:, I:]."""
    name = silu_kernel(x) if x.is_cuda else None
    if name is None:
        return silu_and_mul_ref(x)
    out = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype, device=x.device)
    _launch(x.dtype, silu_launch(name, x, out))
    return out
