"""The sm_90 prefill attention kernel (cuda/prefill_attention.cu): paged K/V, GQA packed.

Same arguments and result as `cuda.paged_attention.paged_attention` for steps with
q_len > 1 (prefill, chunked prefill, mixed batches; layout in cuda/paged_attention.py).
One compiled module per (dtype, head_dim), one kernel per tile configuration::

    prefill_m{BM}n{BN}w{WARPS}s{STAGES}   BM query rows x BN keys per tile, WARPS warps,
                                          a STAGES-deep cp.async ring of K/V tiles
    grid  (num_kv_heads, batch, ceil(max_query_len * group / BM))   z = 0: heaviest tiles
    smem  1 KiB alignment pad + Q tile + 2 x STAGES K/V tiles + page ids + row limits

The grid depends only on max_query_len (a host bound), never on this step's lengths, so a
launch can be captured in a CUDA graph. What the kernel does not cover (FP8 KV caches,
head dims other than 64/128, CPU tensors, ...) is `unsupported_reason`'s to say; callers
then use the older kernel in cuda/paged_attention_kernels.py (`attention_cuda` does).

HEADRACE_PREFILL_KERNEL picks the prefill path: round 2 (cuda/prefill_v2.py, the default
since session 8): `v2` or a name such as `v2_m128n64w4s2k32p`; round 1 (this module): `new`
(DEFAULT_CONFIG of the head dim) or a configuration name such as `m128n64w8s2`; `old`
(paged_attention_kernels.py's prefill kernel). HEADRACE_PREFILL_FP8 picks the path of FP8 KV
caches: `new` (default: round 2, in the configuration HEADRACE_PREFILL_KERNEL names if it
names one of round 2's, else round 2's default) or `old` (the older kernel).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cuda import compiler
from cuda.paged_attention import AttentionMetadata, AttentionParams

log = logging.getLogger(__name__)

SOURCE_PATH = Path(__file__).with_name("prefill_attention.cu")
HEAD_DIMS = (64, 128)
DTYPES = {torch.bfloat16: 1, torch.float16: 0}
LOG2E = 1.4426950408889634
SMEM_LIMIT = 227 * 1024  # sm_90's opt-in maximum of dynamic shared memory per block
MAX_GRID_Z = 65535
ENV = "HEADRACE_PREFILL_KERNEL"
FP8_ENV = "HEADRACE_PREFILL_FP8"


@dataclass(frozen=True, slots=True)
class TileConfig:
    """One instantiation of the kernel template (its entry point in the .cu source)."""

    block_m: int  # query rows (token x group head) per block
    block_n: int  # keys per K/V tile
    warps: int  # warps per block; each owns block_m / warps rows
    stages: int  # K/V tiles in the cp.async ring

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.warps}s{self.stages}"

    @property
    def kernel_name(self) -> str:
        return f"prefill_{self.name}"

    @property
    def threads(self) -> int:
        return self.warps * 32

    def smem_bytes(self, head_dim: int) -> int:
        """Dynamic shared memory of one block; must match Tile::SMEM_BYTES in the source."""
        tiles = (self.block_m + 2 * self.stages * self.block_n) * head_dim * 2
        return 1024 + tiles + 2 * self.block_n * 4 + self.block_m * 4


CONFIGS = (
    TileConfig(128, 64, 4, 2),
    TileConfig(128, 64, 8, 2),
    TileConfig(128, 64, 8, 3),
    TileConfig(64, 64, 4, 2),
    TileConfig(128, 128, 8, 2),
)
BY_NAME = {c.name: c for c in CONFIGS}
# FlashAttention-2's Hopper choice at both head dims: 128 x 64 tiles, 4 warps of 32 rows,
# two blocks per SM (shared memory 97 KiB per block at head_dim 128).
DEFAULT_CONFIG = {128: BY_NAME["m128n64w4s2"], 64: BY_NAME["m128n64w4s2"]}

_warned: set[str] = set()


def source() -> str:
    return compiler.read_source(SOURCE_PATH)


def module_defines(dtype: torch.dtype, head_dim: int) -> dict[str, int | str]:
    return {"HR_BF16": DTYPES[dtype], "HR_HEAD_DIM": head_dim}


def choice_from_env(environ: dict[str, str] | None = None) -> str:
    """HEADRACE_PREFILL_KERNEL's value: 'new', 'old', a configuration name, 'v2' or a
    round-2 configuration name."""
    from cuda import prefill_v2

    value = (environ if environ is not None else os.environ).get(ENV, "v2").strip() or "v2"
    if value not in ("new", "old") and value not in BY_NAME and not prefill_v2.is_choice(value):
        allowed = ", ".join(["new", "old", *BY_NAME, "v2", *prefill_v2.BY_NAME])
        raise ValueError(f"{ENV}={value!r}: expected one of {allowed}")
    return value


def fp8_choice_from_env(environ: dict[str, str] | None = None) -> str:
    """HEADRACE_PREFILL_FP8's value: 'old' (FP8 KV prefills on the older kernel) or 'new'."""
    value = (environ if environ is not None else os.environ).get(FP8_ENV, "new").strip() or "new"
    if value not in ("new", "old"):
        raise ValueError(f"{FP8_ENV}={value!r}: expected new or old")
    return value


def config_for(choice: str, head_dim: int) -> TileConfig | None:
    """Round 1's tile configuration a choice runs at this head dim; None: the old kernel
    (or round 2, for its choices)."""
    if choice == "old" or (choice not in BY_NAME and choice != "new"):
        return None
    if choice == "new":
        return DEFAULT_CONFIG.get(head_dim)
    return BY_NAME[choice]


def unsupported_reason(
    q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, fp8_ok: bool = False
) -> str | None:
    """Why this kernel cannot run these tensors, or None if it can. fp8_ok: the caller's
    kernel also takes float8_e4m3fn caches (round 2, cuda/prefill_v2.py)."""
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
    if math.ceil(rows / min(c.block_m for c in CONFIGS)) > MAX_GRID_Z:
        return f"{rows} query rows need more than {MAX_GRID_Z} row tiles"
    return None


def launch_grid(
    config: TileConfig, max_query_len: int, group: int, num_kv_heads: int, batch: int
) -> tuple[int, int, int]:
    """(KV heads, requests, row tiles of the longest request): from host bounds only."""
    tiles = math.ceil(max_query_len * group / config.block_m)
    if tiles > MAX_GRID_Z:
        raise ValueError(f"max_query_len {max_query_len} x group {group} needs {tiles} row tiles")
    return (num_kv_heads, batch, tiles)


def _kernel(dtype: torch.dtype, head_dim: int, config: TileConfig) -> Any:
    mod = compiler.load_module(
        source(), defines=module_defines(dtype, head_dim), name="prefill_attention"
    )
    kernel = mod.kernel(config.kernel_name)
    _allow_smem(kernel, config.smem_bytes(head_dim))
    return kernel


def _allow_smem(kernel: Any, nbytes: int) -> None:
    """Opt the kernel in to more than 48 KiB of dynamic shared memory and the largest
    carveout, so two blocks fit on an SM (compiler.allow_shared_memory)."""
    if nbytes > SMEM_LIMIT:
        raise ValueError(f"prefill tile needs {nbytes} bytes of shared memory (> {SMEM_LIMIT})")
    compiler.allow_shared_memory(kernel, nbytes, torch.cuda.current_device())


def kernel_args(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    params: AttentionParams,
    out: torch.Tensor,
) -> tuple[Any, ...]:
    """The kernel's arguments, in the order of HR_PREFILL_ARGS."""
    window = params.sliding_window
    if window is not None and window <= 0:
        raise ValueError(f"sliding_window must be positive, got {window}")
    num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape[1:]
    return (
        q.data_ptr(),
        np.int64(q.stride(0)),
        kv_cache.data_ptr(),
        np.int64(num_blocks * block_size * num_kv_heads * head_dim),
        md.query_start_loc.data_ptr(),
        md.seq_lens.data_ptr(),
        md.block_tables.data_ptr(),
        np.int32(md.block_tables.stride(0)),
        out.data_ptr(),
        np.int64(out.stride(0)),
        np.int32(num_kv_heads),
        np.int32(q.shape[1] // num_kv_heads),
        np.int32(block_size.bit_length() - 1),
        np.float32(params.scale * LOG2E),
        np.int32(window or 0),
    )


def _check(q: torch.Tensor, out: torch.Tensor, md: AttentionMetadata) -> None:
    for t, what in ((q, "q"), (out, "out")):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2] or t.stride(0) % 8 or t.data_ptr() % 16:
            raise ValueError(f"{what} must be [T, H, D] with contiguous heads and 16-byte rows")
    if md.query_start_loc.dtype != torch.int32 or md.seq_lens.dtype != torch.int32:
        raise ValueError("query_start_loc and seq_lens must be int32")
    if md.block_tables.dtype != torch.int32 or md.block_tables.stride(1) != 1:
        raise ValueError("block_tables must be int32 with contiguous rows")


def prefill_attention_cuda(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    md: AttentionMetadata,
    params: AttentionParams,
    out: torch.Tensor,  # [T, Hq, D]
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Attention of every query row on torch's current stream; no host sync. The caller
    checked `unsupported_reason` (None). config: a tile configuration (default: the head
    dim's DEFAULT_CONFIG)."""
    _check(q, out, md)
    batch, head_dim = md.seq_lens.shape[0], q.shape[2]
    if batch == 0 or md.max_query_len <= 0 or q.shape[0] == 0:
        return out
    config = config or DEFAULT_CONFIG[head_dim]
    group = q.shape[1] // kv_cache.shape[3]
    grid = launch_grid(config, md.max_query_len, group, kv_cache.shape[3], batch)
    kernel = _kernel(q.dtype, head_dim, config)
    args = kernel_args(q, kv_cache, md, params, out)
    compiler.launch(kernel, grid, config.threads, *args, shmem=config.smem_bytes(head_dim))
    return out


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
    """Paged attention on the GPU: steps with q_len > 1 on round 1 or round 2 (when it
    covers them and `choice` is not 'old'; FP8 caches on round 2 when `fp8_choice` is
    'new'), everything else on cuda/paged_attention_kernels.py."""
    from cuda import prefill_v2
    from cuda.paged_attention_kernels import paged_attention_cuda

    if md.max_query_len > 1 and choice != "old":
        fp8 = kv_cache.dtype == prefill_v2.FP8
        if prefill_v2.is_choice(choice) or (fp8 and fp8_choice == "new"):
            reason = prefill_v2.unsupported_reason(q, kv_cache, md)
            if reason is None:
                v2 = prefill_v2.config_for(choice)
                return prefill_v2.prefill_v2_cuda(q, kv_cache, md, params, out, v2)
        else:
            config = config_for(choice, q.shape[2])
            reason = "no tile configuration" if config is None else None
            reason = reason or unsupported_reason(q, kv_cache, md)
            if reason is None and config is not None:
                return prefill_attention_cuda(q, kv_cache, md, params, out, config)
        if reason is not None and reason not in _warned:
            _warned.add(reason)
            log.info("prefill attention uses the older kernel: %s", reason)
    return paged_attention_cuda(q, kv_cache, md, params, out, workspace)
