"""CUDA paged attention: flash-decoding for q_len == 1, a tensor-core kernel otherwise.

Same arguments and result as `cuda.paged_attention.paged_attention` (layout and
metadata are drawn in cuda/paged_attention.py). Kernels live in paged_attention_kernels.cu, one compiled module
per (dtype, head_dim); block_size is a run-time power of two.

Decode (max_query_len == 1)::

    grid (splits, Hkv * head_chunks, B)       merge grid (Hq, B)
    block = one KV head x up to 8 query heads  log-sum-exp of the splits -> out
    over one split of the context              (only for requests that used > 1 split)

`splits` comes from fixed maxima (batch size, KV heads, the caller's bound on seq_len),
never from this step's lengths; each request's own split count is derived on the device
from its seq_len, so a CUDA graph captured at short lengths stays right at long ones.

Decode runs cuda/decode_attention.py's tensor-core kernel (block sizes >= 16) unless
HEADRACE_DECODE_KERNEL=old, which keeps the CUDA-core decode_g* kernels here.

Sliding-window attention (Mistral, Mixtral) runs in the same kernels (`sliding_window`).

Unsupported shapes (head_dim not 64/128, other dtypes, block_size not a power of two) and
CPU tensors fall back to the torch reference, which syncs the host and cannot be captured.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cuda import compiler, decode_attention
from cuda.paged_attention import AttentionMetadata, AttentionParams, paged_attention_ref

log = logging.getLogger(__name__)

SOURCE_PATH = Path(__file__).with_name("paged_attention_kernels.cu")
HEAD_DIMS = (64, 128)
DTYPES = {torch.bfloat16: 1, torch.float16: 0}
MAX_SPLITS = 64
MIN_CHUNK = 128  # must match MIN_CHUNK in the .cu source
PREFILL_BLOCK_M = 64
LOG2E = 1.4426950408889634

_warned: set[str] = set()
_slots: dict[int, int] = {}


def source() -> str:
    return compiler.read_source(SOURCE_PATH)


FP8 = torch.float8_e4m3fn
KV_DTYPES = (FP8,)  # besides the query dtype itself


def module_defines(
    dtype: torch.dtype, head_dim: int, kv_dtype: torch.dtype | None = None
) -> dict[str, int | str]:
    """Macros of one compiled module: query/output dtype, head dim, KV element type."""
    return {"HR_BF16": DTYPES[dtype], "HR_HEAD_DIM": head_dim, "HR_KV_FP8": int(kv_dtype == FP8)}


def unsupported_reason(q: torch.Tensor, kv_cache: torch.Tensor) -> str | None:
    """Why the CUDA kernels cannot run these tensors, or None if they can."""
    if not q.is_cuda:
        return "tensors are not on a CUDA device"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (kernels take bf16/fp16)"
    if kv_cache.dtype != q.dtype and kv_cache.dtype not in KV_DTYPES:
        return f"kv_cache dtype {kv_cache.dtype} (kernels take q's dtype or float8_e4m3fn)"
    head_dim = q.shape[2]
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} (kernels take {HEAD_DIMS})"
    block_size = kv_cache.shape[2]
    if block_size & (block_size - 1):
        return f"block_size {block_size} is not a power of two"
    if q.shape[1] % kv_cache.shape[3]:
        return "num_q_heads is not a multiple of num_kv_heads"
    if not kv_cache.is_contiguous():
        return "kv_cache is not contiguous"
    return None


def _group_chunk(group: int) -> int:
    """Query heads per decode block (a kernel instantiation: 1, 2, 4 or 8)."""
    for gq in (1, 2, 4):
        if group <= gq:
            return gq
    return 8


num_sms = compiler.num_sms  # a module name, so tests can fake the SM count


def decode_num_splits(
    batch: int, num_kv_heads: int, group: int, max_seq_len: int, slots: int
) -> int:
    """Grid width of the decode kernel, from fixed maxima only.

    slots = resident decode blocks on the whole GPU (SMs x blocks per SM). A nearly empty
    last wave costs as much as a full one, so take the fewest splits whose waves are at
    least 90% full, else the fullest.
    """
    blocks = batch * num_kv_heads * math.ceil(group / _group_chunk(group))
    limit = max(1, min(MAX_SPLITS, math.ceil(max(max_seq_len, 1) / MIN_CHUNK)))
    best, best_eff = 1, 0.0
    for splits in range(1, limit + 1):
        total = blocks * splits
        eff = total / (math.ceil(total / slots) * slots)
        if eff >= 0.9:
            return splits
        if eff > best_eff:
            best, best_eff = splits, eff
    return best


def decode_slots(kernel: object, device: torch.device) -> int:
    """Decode blocks resident on the whole GPU at once."""
    key = id(kernel)
    n = _slots.get(key)
    if n is None:
        n = num_sms(device) * compiler.blocks_per_sm(kernel, 128)
        _slots[key] = n
    return n


def decode_workspace_numel(batch: int, num_q_heads: int, head_dim: int, splits: int) -> int:
    """fp32 elements of the decode workspace: partial outputs and their log-sum-exps."""
    return batch * num_q_heads * splits * (head_dim + 1)


def decode_splits(
    dtype: torch.dtype,
    head_dim: int,
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    max_seq_len: int,
    device: torch.device,
    kv_dtype: torch.dtype | None = None,
    block_size: int | None = None,
) -> int:
    """Split count the decode path will use for these fixed maxima (compiles if needed);
    block_size None: a block size the new kernel takes."""
    group = num_q_heads // num_kv_heads
    # both split rules' order: decode_attention.plan_for's, _old_decode_splits'
    args = (dtype, head_dim, batch, num_kv_heads, group, max_seq_len, device)
    fp8 = kv_dtype == FP8
    if decode_attention.applies(block_size or decode_attention.MIN_BLOCK_SIZE, fp8):
        return decode_attention.plan_for(*args, fp8).splits
    return _old_decode_splits(*args, kv_dtype)


def _old_decode_splits(
    dtype: torch.dtype,
    head_dim: int,
    batch: int,
    num_kv_heads: int,
    group: int,
    max_seq_len: int,
    device: torch.device,
    kv_dtype: torch.dtype | None,
) -> int:
    """The old kernel's split count (the arguments in decode_attention.plan_for's order)."""
    kernel = _kernel(dtype, head_dim, f"decode_g{_group_chunk(group)}", kv_dtype)
    return decode_num_splits(batch, num_kv_heads, group, max_seq_len, decode_slots(kernel, device))


def decode_workspace(
    dtype: torch.dtype,
    head_dim: int,
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    max_seq_len: int,
    device: torch.device,
    kv_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A decode workspace for a CUDA graph of this batch size and seq_len bound (big enough
    for either decode kernel, whatever HEADRACE_DECODE_KERNEL and the block size pick)."""
    group = num_q_heads // num_kv_heads
    args = (dtype, head_dim, batch, num_kv_heads, group, max_seq_len, device)
    old = _old_decode_splits(*args, kv_dtype)
    splits = max(old, decode_attention.plan_for(*args, kv_dtype == FP8).splits)
    numel = decode_workspace_numel(batch, num_q_heads, head_dim, splits)
    return torch.empty(numel, dtype=torch.float32, device=device)


def _kernel(
    dtype: torch.dtype, head_dim: int, name: str, kv_dtype: torch.dtype | None = None
) -> object:
    mod = compiler.load_module(
        source(), defines=module_defines(dtype, head_dim, kv_dtype), name="paged_attention"
    )
    return mod.kernel(name)


def _check_layout(t: torch.Tensor, what: str) -> None:
    if t.stride(2) != 1 or t.stride(1) != t.shape[2] or t.stride(0) % 8 or t.data_ptr() % 16:
        raise ValueError(f"{what} must be [T, H, D] with contiguous heads and 16-byte rows")


def paged_attention_cuda(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    md: AttentionMetadata,
    params: AttentionParams,
    out: torch.Tensor,  # [T, Hq, D]
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged attention on torch's current stream; no host sync, CUDA-graph capturable.

    An FP8 (float8_e4m3fn) kv_cache holds K / k_scale and V / v_scale.
    md.max_query_len: bound on this step's q_len (1 selects the decode kernels).
    md.max_seq_len: bound on every seq_len while the launch (or a graph of it) is used; it
    only sizes the decode split grid, so a larger bound costs nothing in correctness.
    workspace: fp32, at least `decode_workspace_numel(...)` elements (allocated if None).
    """
    reason = unsupported_reason(q, kv_cache)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            log.warning("paged attention falls back to the torch reference: %s", reason)
        return paged_attention_ref(q, kv_cache, md, params, out)
    _check_layout(q, "q")
    _check_layout(out, "out")
    batch = md.seq_lens.shape[0]
    if batch == 0 or md.max_query_len <= 0 or q.shape[0] == 0:
        return out
    _check_metadata(md)
    num_blocks, block_size, num_kv_heads = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3]
    v_off = num_blocks * block_size * num_kv_heads * q.shape[2]
    common = (
        q.data_ptr(),
        np.int64(q.stride(0)),
        kv_cache.data_ptr(),
        np.int64(v_off),
        md.query_start_loc.data_ptr(),
        md.seq_lens.data_ptr(),
        md.block_tables.data_ptr(),
        np.int32(md.block_tables.stride(0)),
        out.data_ptr(),
        np.int64(out.stride(0)),
    )
    group = q.shape[1] // num_kv_heads
    kv_dtype = kv_cache.dtype if kv_cache.dtype == FP8 else None
    heads = _trailing_args(num_kv_heads, group, block_size, params, kv_dtype)
    if md.max_query_len == 1:
        _launch_decode(q, out, md, common, heads, workspace, kv_dtype)
    else:
        grid = (math.ceil(md.max_query_len * group / PREFILL_BLOCK_M), num_kv_heads, batch)
        kernel = _kernel(q.dtype, q.shape[2], "prefill", kv_dtype)
        compiler.launch(kernel, grid, 128, *common, *heads)
    return out


def _trailing_args(
    num_kv_heads: int,
    group: int,
    block_size: int,
    params: AttentionParams,
    kv_dtype: torch.dtype | None,
) -> tuple[Any, ...]:
    """Every kernel's trailing arguments: heads, group, log2(block_size), scale in log2
    units (FP8: scores are (q . k_cache) * k_scale, so k_scale joins it), v_scale, the
    sliding window (0: none)."""
    window = params.sliding_window
    if window is not None and window <= 0:
        raise ValueError(f"sliding_window must be positive, got {window}")
    fp8 = kv_dtype is not None
    return (
        np.int32(num_kv_heads),
        np.int32(group),
        np.int32(block_size.bit_length() - 1),
        np.float32(params.scale * LOG2E * (params.k_scale if fp8 else 1.0)),
        np.float32(params.v_scale if fp8 else 1.0),
        np.int32(window or 0),
    )


def _check_metadata(md: AttentionMetadata) -> None:
    if md.query_start_loc.dtype != torch.int32 or md.seq_lens.dtype != torch.int32:
        raise ValueError("query_start_loc and seq_lens must be int32")
    if md.block_tables.dtype != torch.int32 or md.block_tables.stride(1) != 1:
        raise ValueError("block_tables must be int32 with contiguous rows")


def _launch_decode(
    q: torch.Tensor,
    out: torch.Tensor,
    md: AttentionMetadata,
    common: tuple[Any, ...],
    heads: tuple[Any, ...],
    workspace: torch.Tensor | None,
    kv_dtype: torch.dtype | None,
) -> None:
    """Flash-decoding: each (split of a sequence, KV head) writes a partial result to the
    workspace; a second kernel merges the splits when there is more than one."""
    if decode_attention.applies(1 << int(heads[2]), kv_dtype is not None):  # else: below
        args = (md.seq_lens, md.query_start_loc, md.max_seq_len, common, heads, workspace)
        decode_attention.launch_decode(q, out, *args, kv_dtype is not None)
        return
    batch, num_q_heads, head_dim = md.seq_lens.shape[0], q.shape[1], q.shape[2]
    num_kv_heads, group = int(heads[0]), int(heads[1])
    gq = _group_chunk(group)
    kernel = _kernel(q.dtype, head_dim, f"decode_g{gq}", kv_dtype)
    splits = decode_num_splits(
        batch, num_kv_heads, group, md.max_seq_len, decode_slots(kernel, q.device)
    )
    need = decode_workspace_numel(batch, num_q_heads, head_dim, splits)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=q.device)
    elif workspace.dtype != torch.float32 or workspace.numel() < need:
        raise ValueError(f"workspace must be float32 with at least {need} elements")
    part_o = workspace.data_ptr()
    part_lse = part_o + batch * num_q_heads * splits * head_dim * 4
    grid = (splits, num_kv_heads * math.ceil(group / gq), batch)
    compiler.launch(kernel, grid, 128, *common, part_o, part_lse, *heads)
    if splits > 1:
        compiler.launch(
            _kernel(q.dtype, head_dim, "merge_splits", kv_dtype),
            (num_q_heads, batch),
            head_dim,
            part_o,
            part_lse,
            md.query_start_loc.data_ptr(),
            md.seq_lens.data_ptr(),
            out.data_ptr(),
            np.int64(out.stride(0)),
            np.int32(splits),
            heads[5],  # the sliding window
        )
