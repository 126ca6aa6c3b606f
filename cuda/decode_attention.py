"""Tensor-core decode attention (cuda/decode_attention.cu): the split plan and the launches.

    grid (splits, Hkv * ceil(group / 8), B), 64 threads     merge grid (Hq, B), D threads
    a block = one KV head x up to 8 query heads over one    log-sum-exp of the splits
    split of the context; 2 warps stream 16-token tiles     (only launched if splits > 1;
    through a cp.async pipeline (3-4 stages, 48 KB)         requests with one split skip it)

The split count is `plan_decode`'s: a pure function of the batch, the KV heads, the query
group, the bound on seq_len and the GPU's block slots, computed from fixed maxima only (a
CUDA graph captured at short lengths stays right at long ones: each request's own split
count comes from its seq_len on the device, with the same `min_chunk`).

HEADRACE_DECODE_KERNEL picks: `auto` (the default) this kernel for FP8 KV caches and the
previous CUDA-core kernels (decode_g1..g8 in cuda/paged_attention_kernels.cu) for 16-bit
ones, where they measured faster; `new` or `old` forces one. Block sizes under 16 tokens
always take the old kernels (a 16-token tile must sit in one page).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cuda import compiler

SOURCE_PATH = Path(__file__).with_name("decode_attention.cu")
ENV = "HEADRACE_DECODE_KERNEL"
CHOICES = ("auto", "new", "old")
MAX_SPLITS = 64  # worker/cuda_attention.py sizes its workspace for this many
MIN_CHUNK = 128  # tokens: the shortest split (as the old kernels); large batches take fewer
HEADS_PER_BLOCK = 8
THREADS = 64
MIN_BLOCK_SIZE = 16  # the kernel's tile: one page read per 16 tokens
FULL_WAVE = 0.9  # take the fewest splits whose last wave is at least this full
SATURATING_BLOCKS_PER_SM = 4  # ~128 KB of loads in flight per SM: more blocks add nothing

_slots: dict[tuple[int, str], int] = {}


def kernel_choice() -> str:
    """`auto`, `new` or `old`, from HEADRACE_DECODE_KERNEL (read at each call, so a
    benchmark can time both in one process)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV} must be one of {CHOICES}, got {value!r}")
    return value


def applies(block_size: int, kv_fp8: bool = False) -> bool:
    """Whether decode steps of a cache with this block size run the new kernel. `auto`
    (the default) takes it for FP8 KV caches only: on an H200 (52e44f0) it reads FP8 at
    54-78% of copy bandwidth against the old kernels' 33-44%, but 16-bit KV at 63-75%
    against their 62-86% (BENCHMARKS.md, kernel micro-benchmarks)."""
    choice = kernel_choice()
    wanted = choice == "new" or (choice == "auto" and kv_fp8)
    return wanted and block_size >= MIN_BLOCK_SIZE


TILE = 16  # tokens per warp per pipeline stage (the k of one P V mma)
WARPS = THREADS // 32
SMEM_BYTES = 48 * 1024  # static shared memory of a block


def pipeline_stages(head_dim: int, kv_bytes: int) -> int:
    """cp.async stages of a warp (the kernel's STAGES): as many 16-token K+V tiles as fit
    48 KB for the block's warps, at most 4."""
    stage = TILE * 2 * head_dim * kv_bytes  # one warp's tile of K and V
    return min(4, SMEM_BYTES // (WARPS * stage))


def smem_bytes(head_dim: int, kv_bytes: int) -> int:
    """The kernel's static shared memory: every warp's stages."""
    return WARPS * pipeline_stages(head_dim, kv_bytes) * TILE * 2 * head_dim * kv_bytes


@dataclass(frozen=True)
class DecodePlan:
    splits: int  # grid width: the most splits any request may use
    min_chunk: int  # tokens: the shortest split the device cuts a request into
    blocks: int  # blocks with work when every request is at the bound
    slots: int  # blocks resident on the GPU at once (the wave size)

    @property
    def merge(self) -> bool:
        """Whether the merge kernel runs (no request can use more than one split if not)."""
        return self.splits > 1


@functools.lru_cache(maxsize=4096)  # eager decode asks once per layer and step
def plan_decode(
    batch: int,
    num_kv_heads: int,
    group: int,
    max_seq_len: int,
    num_sms: int,
    blocks_per_sm: int,
) -> DecodePlan:
    """The decode grid for these fixed maxima.

    A block is one (request, KV head, chunk of 8 query heads, split). Splits are added only
    while the blocks cannot fill the GPU: take the fewest splits (each at least MIN_CHUNK
    tokens of the bound, at most MAX_SPLITS) whose last wave of blocks is at least 90% full,
    else the fullest. The wave is num_sms x min(blocks_per_sm, 4): four resident blocks keep
    ~128 KB of loads in flight per SM, so counting more would only buy merges.
    """
    for name, value in (
        ("batch", batch),
        ("num_kv_heads", num_kv_heads),
        ("group", group),
        ("num_sms", num_sms),
        ("blocks_per_sm", blocks_per_sm),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    pairs = batch * num_kv_heads * math.ceil(group / HEADS_PER_BLOCK)
    slots = num_sms * min(blocks_per_sm, SATURATING_BLOCKS_PER_SM)
    limit = max(1, min(MAX_SPLITS, math.ceil(max(max_seq_len, 1) / MIN_CHUNK)))
    best, best_eff = 1, 0.0
    for splits in range(1, limit + 1):
        total = pairs * splits
        eff = total / (math.ceil(total / slots) * slots)
        if eff >= FULL_WAVE:
            best = splits
            break
        if eff > best_eff:
            best, best_eff = splits, eff
    return DecodePlan(best, MIN_CHUNK, pairs * best, slots)


def source() -> str:
    return compiler.read_source(SOURCE_PATH)


def module_defines(dtype: torch.dtype, head_dim: int) -> dict[str, int | str]:
    """Macros of one compiled module (the KV type is a template parameter inside it)."""
    return {"HR_BF16": int(dtype == torch.bfloat16), "HR_HEAD_DIM": head_dim}


def kernel_name(kv_fp8: bool) -> str:
    return "decode_tc_fp8" if kv_fp8 else "decode_tc"


def _kernel(dtype: torch.dtype, head_dim: int, name: str) -> object:
    mod = compiler.load_module(
        source(), defines=module_defines(dtype, head_dim), name="decode_attention"
    )
    return mod.kernel(name)


def _slots_per_sm(kernel: object, device: torch.device, key: str) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _slots.get((idx, key))
    if n is None:
        n = compiler.blocks_per_sm(kernel, THREADS)
        _slots[(idx, key)] = n
    return n


def plan_for(
    dtype: torch.dtype,
    head_dim: int,
    batch: int,
    num_kv_heads: int,
    group: int,
    max_seq_len: int,
    device: torch.device,
    kv_fp8: bool,
) -> DecodePlan:
    """plan_decode with this GPU's SM count and the kernel's occupancy (compiles if needed)."""
    from cuda.paged_attention_kernels import num_sms

    name = kernel_name(kv_fp8)
    kernel = _kernel(dtype, head_dim, name)
    per_sm = _slots_per_sm(kernel, device, f"{dtype}-{head_dim}-{name}")
    return plan_decode(batch, num_kv_heads, group, max_seq_len, num_sms(device), per_sm)


def launch_decode(
    q: torch.Tensor,
    out: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_seq_len: int,
    common: tuple[Any, ...],
    heads: tuple[Any, ...],
    workspace: torch.Tensor | None,
    kv_fp8: bool,
) -> None:
    """The decode kernel, then the merge if the plan has several splits.

    common: paged_attention_kernels' leading arguments (q .. out_stride); heads: its
    trailing ones (num_kv_heads, group, block_shift, scale_log2, v_scale, window).
    """
    from cuda.paged_attention_kernels import decode_workspace_numel

    batch, num_q_heads, head_dim = seq_lens.shape[0], q.shape[1], q.shape[2]
    num_kv_heads, group = int(heads[0]), int(heads[1])
    plan = plan_for(q.dtype, head_dim, batch, num_kv_heads, group, max_seq_len, q.device, kv_fp8)
    need = decode_workspace_numel(batch, num_q_heads, head_dim, plan.splits)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=q.device)
    elif workspace.dtype != torch.float32 or workspace.numel() < need:
        raise ValueError(f"workspace must be float32 with at least {need} elements")
    part_o = workspace.data_ptr()
    part_lse = part_o + batch * num_q_heads * plan.splits * head_dim * 4
    grid = (plan.splits, num_kv_heads * math.ceil(group / HEADS_PER_BLOCK), batch)
    min_chunk = np.int32(plan.min_chunk)
    kernel = _kernel(q.dtype, head_dim, kernel_name(kv_fp8))
    compiler.launch(kernel, grid, THREADS, *common, part_o, part_lse, *heads, min_chunk)
    if plan.merge:
        compiler.launch(
            _kernel(q.dtype, head_dim, "decode_tc_merge"),
            (num_q_heads, batch),
            head_dim,
            part_o,
            part_lse,
            query_start_loc.data_ptr(),
            seq_lens.data_ptr(),
            out.data_ptr(),
            np.int64(out.stride(0)),
            np.int32(plan.splits),
            heads[5],  # the sliding window
            min_chunk,
        )
