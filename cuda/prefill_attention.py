"""Prefill attention on the GPU: the routing of steps with q_len > 1, and the checks and
constants the prefill kernel (round 2: cuda/prefill_v2.py, cuda/prefill_attention_v2.cu)
shares with its callers.

Same arguments and result as `cuda.paged_attention.paged_attention` for steps with
q_len > 1 (prefill, chunked prefill, mixed batches; layout in cuda/paged_attention.py).
`attention_cuda` sends such steps to round 2 when it covers them (`unsupported_reason` says
what it does not: head dims other than 64/128, CPU tensors, ...) and everything else,
decode steps included, to the older kernels in cuda/paged_attention_kernels.py.

HEADRACE_PREFILL_KERNEL picks the prefill path: `v2` (the default: round 2 in its
DEFAULT_CONFIG), a round-2 configuration name such as `v2_m128n64w4s2k32p`, or `old`
(paged_attention_kernels.py's prefill kernel); `new` is another name for `v2`.
HEADRACE_PREFILL_FP8 picks the path of FP8 KV caches: `new` (default: round 2, in the
configuration HEADRACE_PREFILL_KERNEL names) or `old` (the older kernel).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from cuda import compiler
from cuda.paged_attention import AttentionMetadata, AttentionParams

log = logging.getLogger(__name__)

HEAD_DIMS = (64, 128)
DTYPES = {torch.bfloat16: 1, torch.float16: 0}
LOG2E = 1.4426950408889634
SMEM_LIMIT = 227 * 1024  # sm_90's opt-in maximum of dynamic shared memory per block
MAX_GRID_Z = 65535
ENV = "HEADRACE_PREFILL_KERNEL"
FP8_ENV = "HEADRACE_PREFILL_FP8"
# `new` once named the first tensor-core prefill kernel (removed: round 2 replaced it) as
# opposed to `old`; it stays an alias of the default so that a setting made for that kernel
# still runs the tensor-core path, and it is the word HEADRACE_PREFILL_FP8 uses for round 2.
ALIASES = {"new": "v2"}

_warned: set[str] = set()


def choice_from_env(environ: dict[str, str] | None = None) -> str:
    """HEADRACE_PREFILL_KERNEL's value: 'v2', a round-2 configuration name or 'old' ('new'
    reads as 'v2')."""
    from cuda import prefill_v2

    value = (environ if environ is not None else os.environ).get(ENV, "v2").strip() or "v2"
    value = ALIASES.get(value, value)
    if value != "old" and not prefill_v2.is_choice(value):
        allowed = ", ".join(["v2", *prefill_v2.BY_NAME, "old", *ALIASES])
        raise ValueError(f"{ENV}={value!r}: expected one of {allowed}")
    return value


def fp8_choice_from_env(environ: dict[str, str] | None = None) -> str:
    """HEADRACE_PREFILL_FP8's value: 'old' (FP8 KV prefills on the older kernel) or 'new'."""
    value = (environ if environ is not None else os.environ).get(FP8_ENV, "new").strip() or "new"
    if value not in ("new", "old"):
        raise ValueError(f"{FP8_ENV}={value!r}: expected new or old")
    return value


def unsupported_reason(
    q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, fp8_ok: bool = False
) -> str | None:
    """Why the prefill kernel cannot run these tensors, or None if it can. fp8_ok: also take
    float8_e4m3fn caches (cuda/prefill_v2.py passes True)."""
    from cuda import prefill_v2

    if not q.is_cuda:
        return "tensors are not on a CUDA device"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (the kernel takes bf16/fp16)"
    if kv_cache.dtype != q.dtype and not (fp8_ok and kv_cache.dtype == torch.float8_e4m3fn):
        return f"kv_cache dtype {kv_cache.dtype} differs from q's {q.dtype}"
    if q.shape[2] not in HEAD_DIMS:
        return f"head_dim {q.shape[2]} (the kernel takes {HEAD_DIMS})"
    block_size = kv_cache.shape[2]
    if block_size <= 0 or block_size & (block_size - 1):
        return f"block_size {block_size} is not a power of two"
    if q.shape[1] % kv_cache.shape[3]:
        return "num_q_heads is not a multiple of num_kv_heads"
    if not kv_cache.is_contiguous():
        return "kv_cache is not contiguous"
    rows = md.max_query_len * (q.shape[1] // kv_cache.shape[3])
    if math.ceil(rows / min(c.block_m for c in prefill_v2.CONFIGS)) > MAX_GRID_Z:
        return f"{rows} query rows need more than {MAX_GRID_Z} row tiles"
    return None


def _allow_smem(kernel: Any, nbytes: int) -> None:
    """Opt the kernel in to more than 48 KiB of dynamic shared memory and the largest
    carveout, so two blocks fit on an SM (compiler.allow_shared_memory)."""
    if nbytes > SMEM_LIMIT:
        raise ValueError(f"prefill tile needs {nbytes} bytes of shared memory (> {SMEM_LIMIT})")
    compiler.allow_shared_memory(kernel, nbytes, torch.cuda.current_device())


def _check(q: torch.Tensor, out: torch.Tensor, md: AttentionMetadata) -> None:
    for t, what in ((q, "q"), (out, "out")):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2] or t.stride(0) % 8 or t.data_ptr() % 16:
            raise ValueError(f"{what} must be [T, H, D] with contiguous heads and 16-byte rows")
    if md.query_start_loc.dtype != torch.int32 or md.seq_lens.dtype != torch.int32:
        raise ValueError("query_start_loc and seq_lens must be int32")
    if md.block_tables.dtype != torch.int32 or md.block_tables.stride(1) != 1:
        raise ValueError("block_tables must be int32 with contiguous rows")


def attention_cuda(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    params: AttentionParams,
    out: torch.Tensor,
    workspace: torch.Tensor | None = None,
    choice: str = "v2",
    fp8_choice: str = "new",
) -> torch.Tensor:
    """Paged attention on the GPU: steps with q_len > 1 on round 2 in the configuration
    `choice` names (unless it is 'old', the FP8 cache's `fp8_choice` is 'old', or round 2
    does not cover the tensors), everything else on cuda/paged_attention_kernels.py."""
    from cuda import prefill_v2
    from cuda.paged_attention_kernels import paged_attention_cuda

    choice = ALIASES.get(choice, choice)
    fp8_old = kv_cache.dtype == prefill_v2.FP8 and fp8_choice == "old"
    if md.max_query_len > 1 and choice != "old" and not fp8_old:
        reason = prefill_v2.unsupported_reason(q, kv_cache, md)
        if reason is None:
            config = prefill_v2.config_for(choice)
            return prefill_v2.prefill_v2_cuda(q, kv_cache, md, params, out, config)
        if reason not in _warned:
            _warned.add(reason)
            log.info("prefill attention uses the older kernel: %s", reason)
    return paged_attention_cuda(q, kv_cache, md, params, out, workspace)
