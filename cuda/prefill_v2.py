"""Prefill attention round 2 (cuda/prefill_attention_v2.cu): the default since session 8.

Same arguments and result as `cuda.paged_attention.paged_attention` for q_len > 1, and it also
takes an FP8 (float8_e4m3fn) KV cache holding K / k_scale and V / v_scale. One compiled
module per (dtype, head_dim, KV type), one kernel per configuration::

    prefill2_m{BM}n{BN}w{WARPS}s{STAGES}k{SUB}[p]   a BM x BN tile, scored and softmaxed SUB
                                                    keys at a time; p: the next step's
                                                    Q K^T overlaps this step's softmax
    grid  (num_kv_heads, batch, ceil(max_query_len * group / BM))   z = 0: heaviest tiles
          or, with the metadata's tile map (HEADRACE_PREFILL_GRID=flat, cuda/prefill_tiles.py),
          (num_kv_heads, tiles with work), block y running tile_map[y] = (request, z)
    smem  1 KiB pad + Q + 2 x STAGES K/V tiles as stored (+ one 16-bit K and V tile for
          FP8) + page ids + row limits

Selected by HEADRACE_PREFILL_KERNEL=v2 (the default: DEFAULT_CONFIG) or a configuration's
name such as `v2_m128n64w4s2k32p`; FP8 KV caches use it unless HEADRACE_PREFILL_FP8=old (the
older kernel in cuda/paged_attention_kernels.py). `cuda.prefill_attention`'s
`attention_cuda` does the routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cuda import compiler
from cuda import prefill_attention as pa
from cuda.paged_attention import AttentionMetadata, AttentionParams
from cuda.prefill_tiles import MAX_GRID_Y, TileSpec

SOURCE_PATH = Path(__file__).with_name("prefill_attention_v2.cu")
FP8 = torch.float8_e4m3fn
PREFIX = "v2_"


@dataclass(frozen=True, slots=True)
class V2Config:
    """One instantiation of round 2's kernel template (its entry point in the .cu source)."""

    block_m: int  # query rows (token x group head) per block
    block_n: int  # keys per K/V tile (one cp.async stage)
    warps: int  # warps per block; each owns block_m / warps rows
    stages: int  # K/V tiles in the cp.async ring
    sub: int  # keys per softmax step (S holds sub keys per row at a time)
    pipe: bool = False  # the next step's Q K^T issued before this step's softmax (name: "p")

    @property
    def name(self) -> str:
        tile = f"m{self.block_m}n{self.block_n}w{self.warps}s{self.stages}k{self.sub}"
        return PREFIX + tile + ("p" if self.pipe else "")

    @property
    def kernel_name(self) -> str:
        return "prefill2_" + self.name.removeprefix(PREFIX)

    @property
    def threads(self) -> int:
        return self.warps * 32

    def min_blocks(self) -> int:
        """The blocks per SM its __launch_bounds__ asks for (registers sized for them)."""
        return 2 if self.warps == 4 else 1

    def smem_bytes(self, head_dim: int, fp8: bool = False) -> int:
        """Dynamic shared memory of one block; must match Tile::SMEM_BYTES in the source."""
        raw = self.block_n * head_dim * (1 if fp8 else 2)
        wide = 2 * self.block_n * head_dim * 2 if fp8 else 0
        q = self.block_m * head_dim * 2
        return 1024 + q + 2 * self.stages * raw + wide + 2 * self.block_n * 4 + self.block_m * 4


CONFIGS = (
    V2Config(128, 64, 4, 2, 32),
    V2Config(128, 64, 4, 2, 64),
    V2Config(128, 64, 8, 2, 64),
    V2Config(128, 128, 8, 2, 64),
    V2Config(128, 64, 4, 2, 32, pipe=True),
    V2Config(128, 128, 8, 2, 32, pipe=True),
)
BY_NAME = {c.name: c for c in CONFIGS}
# The default: fastest of the six on every shape the H200 ran in session 8 (bf16 and FP8 KV,
# 1x2k-16k, 4x2k, 8x512 on 4k): 1.06-1.42x torch's flash SDPA. The others are for the
# benchmark to rank.
DEFAULT_CONFIG = BY_NAME["v2_m128n64w4s2k32"]


def source() -> str:
    return compiler.read_source(SOURCE_PATH)


def module_defines(dtype: torch.dtype, head_dim: int, fp8: bool) -> dict[str, int | str]:
    return {"HR_BF16": pa.DTYPES[dtype], "HR_HEAD_DIM": head_dim, "HR_KV_FP8": int(fp8)}


def is_choice(choice: str) -> bool:
    """Does HEADRACE_PREFILL_KERNEL's value name round 2?"""
    return choice == "v2" or choice in BY_NAME


def config_for(choice: str) -> V2Config:
    """Round 2's configuration for a choice ('v2', a v2 name, or anything else: default)."""
    return BY_NAME.get(choice, DEFAULT_CONFIG)


def unsupported_reason(
    q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata
) -> str | None:
    """Why this kernel cannot run these tensors, or None if it can (cuda/prefill_attention.py's
    checks, with FP8 caches allowed)."""
    return pa.unsupported_reason(q, kv_cache, md, fp8_ok=True)


def launch_grid(
    config: V2Config, max_query_len: int, group: int, num_kv_heads: int, batch: int
) -> tuple[int, int, int]:
    """(KV heads, requests, row tiles of the longest request): from host bounds only."""
    tiles = math.ceil(max_query_len * group / config.block_m)
    if tiles > pa.MAX_GRID_Z:
        raise ValueError(f"max_query_len {max_query_len} x group {group} needs {tiles} row tiles")
    return (num_kv_heads, batch, tiles)


def tile_spec(num_heads: int, num_kv_heads: int, choice: str | None = None) -> TileSpec:
    """The (group, BM) a step's tile map is cut for: the model's GQA group and the BM of
    the round-2 configuration HEADRACE_PREFILL_KERNEL (or `choice`) runs."""
    config = config_for(pa.choice_from_env() if choice is None else choice)
    return TileSpec(num_heads // num_kv_heads, config.block_m)


def flat_tiles(md: AttentionMetadata, config: V2Config, group: int) -> torch.Tensor | None:
    """The step's tile map if it was cut for this kernel's (group, BM) and fits gridDim.y;
    None: the z grid."""
    tiles, spec = md.prefill_tiles, md.prefill_tile_spec
    if tiles is None or spec != TileSpec(group, config.block_m):
        return None
    if tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 2:
        raise ValueError(
            f"prefill_tiles must be [N, 2] int32, got {tiles.dtype} {tuple(tiles.shape)}"
        )
    if not tiles.is_contiguous() or tiles.data_ptr() % 8:
        raise ValueError("prefill_tiles must be contiguous and 8-byte aligned (int2 loads)")
    return tiles if tiles.shape[0] <= MAX_GRID_Y else None


def _kernel(dtype: torch.dtype, head_dim: int, fp8: bool, config: V2Config) -> Any:
    mod = compiler.load_module(
        source(), defines=module_defines(dtype, head_dim, fp8), name="prefill_attention_v2"
    )
    kernel = mod.kernel(config.kernel_name)
    pa._allow_smem(kernel, config.smem_bytes(head_dim, fp8))
    return kernel


def kernel_args(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    params: AttentionParams,
    out: torch.Tensor,
    tiles: torch.Tensor | None = None,
) -> tuple[Any, ...]:
    """The kernel's arguments, in the order of HR_PREFILL2_ARGS. FP8: scores are
    (q . k_cache) * k_scale, so k_scale joins the log2 scale; v_scale scales the output.
    tiles: the flat grid's tile map (`flat_tiles`), None for the z grid (a null pointer)."""
    window = params.sliding_window
    if window is not None and window <= 0:
        raise ValueError(f"sliding_window must be positive, got {window}")
    fp8 = kv_cache.dtype == FP8
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
        np.float32(params.scale * pa.LOG2E * (params.k_scale if fp8 else 1.0)),
        np.float32(params.v_scale if fp8 else 1.0),
        np.int32(window or 0),
        0 if tiles is None else tiles.data_ptr(),
    )


def prefill_v2_cuda(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D], q's dtype or FP8
    md: AttentionMetadata,
    params: AttentionParams,
    out: torch.Tensor,  # [T, Hq, D]
    config: V2Config | None = None,
) -> torch.Tensor:
    """Attention of every query row on torch's current stream; no host sync. The caller
    checked `unsupported_reason` (None)."""
    pa._check(q, out, md)
    batch, head_dim = md.seq_lens.shape[0], q.shape[2]
    if batch == 0 or md.max_query_len <= 0 or q.shape[0] == 0:
        return out
    config = config or DEFAULT_CONFIG
    fp8 = kv_cache.dtype == FP8
    group = q.shape[1] // kv_cache.shape[3]
    tiles = flat_tiles(md, config, group)
    if tiles is None:
        grid = launch_grid(config, md.max_query_len, group, kv_cache.shape[3], batch)
    elif tiles.shape[0] == 0:
        return out  # no request has rows
    else:
        grid = (kv_cache.shape[3], tiles.shape[0], 1)
    kernel = _kernel(q.dtype, head_dim, fp8, config)
    args = kernel_args(q, kv_cache, md, params, out, tiles)
    shmem = config.smem_bytes(head_dim, fp8)
    compiler.launch(kernel, grid, config.threads, *args, shmem=shmem)
    return out
