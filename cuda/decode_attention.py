"""Tensor-core decode attention (cuda/decode_attention.cu): the split plan and the launches.

    grid (splits, Hkv * ceil(group / 8), B), 32 W threads; a block = one KV head x up to 8
    query heads over one split of the context; W warps stream 16-token tiles through an
    S-stage cp.async pipeline (dynamic shared memory, W * S * 32 * D * KV bytes). A request
    of one split is written by its block; of several, by the last of its splits to finish
    (log-sum-exp of the splits' partials; merge counters, `merge_counters`). With
    HEADRACE_DECODE_FUSED_MERGE=0 (or no counters inside a capture) the merge kernel does
    it instead: grid (Hq, B), D threads, launched only if the plan has several splits.

W and S are a `DecodeConfig`: 2 warps, 3 stages for 16-bit KV (48 KB, 4 blocks and 8 warps
per SM), 4 warps, 4 stages for FP8 (64 KB). On an H200 (cc98fa0, scripts/bench_decode.py, % of
copy bandwidth at batch 64 x 1k / 4k / 16k and 8 x 16k) w2s3 read bf16 KV at 76.9 / 90.2 /
93.9 / 79.4 against w4s2's 64.3 / 86.7 / 93.3 / 81.0 (w4s3: 74.5 / 89.2 / 93.9 / 83.4).
HEADRACE_DECODE_CONFIG=w<W>s<S> overrides both (the benchmark compares variants).
HEADRACE_DECODE_PLAN=v3 (the default since session 8; `v2` for the fixed variants above,
cuda/decode_plan3.py) picks the variant by the grid's size and cuts no split shorter than two
pipelines; HEADRACE_DECODE_FP8_MATH=f16 (the default since session 8; `auto` widens FP8 to the
model's dtype) runs FP8 KV through decode_tc_fp8h: fp16 mma, so a bf16 model's KV pair takes one e4m3x2 -> f16x2
conversion instead of four (f16x2, two halves to f32, f32x2 to bf16x2; conversions issue at
16 a clock per SM, the FP8 path's bound near copy bandwidth).

The split count is `plan_decode`'s: a pure function of the batch, the KV heads, the query
group, the bound on seq_len and the GPU's block slots, computed from fixed maxima only (a
CUDA graph captured at short lengths stays right at long ones: each request's own split
count comes from its seq_len on the device, with the same `min_chunk`).

HEADRACE_DECODE_KERNEL picks: `auto` (the default) this kernel for every KV cache
(AUTO_16BIT says so for 16-bit ones), `old` the previous CUDA-core kernels (decode_g1..g8 in
cuda/paged_attention_kernels.cu), `new` this one. Block sizes under 16 tokens always take
the old kernels (a 16-token tile must sit in one page).
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cuda import compiler, decode_plan3

SOURCE_PATH = Path(__file__).with_name("decode_attention.cu")
ENV = "HEADRACE_DECODE_KERNEL"
CONFIG_ENV = "HEADRACE_DECODE_CONFIG"
CHOICES = ("auto", "new", "old")
AUTO_16BIT = True  # `auto` runs this kernel on 16-bit KV too (False: the old kernels)
MAX_SPLITS = 64  # worker/cuda_attention.py sizes its workspace for this many
MIN_CHUNK = 128  # tokens: the shortest split (as the old kernels); large batches take fewer
HEADS_PER_BLOCK = 8
MIN_BLOCK_SIZE = 16  # the kernel's tile: one page read per 16 tokens
FULL_WAVE = 0.9  # take the fewest splits whose last wave is at least this full
SATURATING_BLOCKS_PER_SM = 4  # ~128 KB of loads in flight per SM: more blocks add nothing
STATIC_SMEM_LIMIT = 48 * 1024  # past this a kernel must opt in (cudaFuncSetAttribute)
SMEM_LIMIT = 227 * 1024  # sm_90's most dynamic shared memory per block

FP8_MATH_ENV = "HEADRACE_DECODE_FP8_MATH"  # f16: decode_tc_fp8h (fp16 mma on FP8 KV)
PLAN_ENV = "HEADRACE_DECODE_PLAN"  # v3: variant by batch, longer splits (cuda/decode_plan3.py)
FUSED_MERGE_ENV = "HEADRACE_DECODE_FUSED_MERGE"  # 0: the separate merge kernel instead
COUNTERS = 1 << 16  # merge counters allocated at once: batch x KV heads x head chunks

_slots: dict[tuple[int, str], int] = {}
_counters: dict[str, torch.Tensor] = {}
_old_counters: list[torch.Tensor] = []  # a captured graph may still point at one


def kernel_choice() -> str:
    """`auto`, `new` or `old`, from HEADRACE_DECODE_KERNEL (read at each call, so a
    benchmark can time both in one process)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV} must be one of {CHOICES}, got {value!r}")
    return value


def applies(block_size: int, kv_fp8: bool = False) -> bool:
    """Whether decode steps of a cache with this block size run the new kernel. `auto`
    (the default) takes it for FP8 KV caches (round 1, H200 52e44f0: FP8 at 54-78% of copy
    bandwidth against the old kernels' 33-44%) and, with AUTO_16BIT, for 16-bit ones (round
    2: coalesced whole-line copies and 4-warp blocks, against the old kernels' 62-86%)."""
    choice = kernel_choice()
    wanted = choice == "new" or (choice == "auto" and (kv_fp8 or AUTO_16BIT))
    return wanted and block_size >= MIN_BLOCK_SIZE


TILE = 16  # tokens per warp per pipeline stage (the k of one P V mma)


@dataclass(frozen=True)
class DecodeConfig:
    """A compiled variant of the kernel: warps per block and cp.async stages per warp."""

    warps: int
    stages: int

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def name(self) -> str:
        return f"w{self.warps}s{self.stages}"

    def smem_bytes(self, head_dim: int, kv_bytes: int) -> int:
        """Dynamic shared memory of a block: every warp's stages of 16-token K+V tiles."""
        return self.warps * self.stages * TILE * 2 * head_dim * kv_bytes


DEFAULT_CONFIGS = {2: DecodeConfig(2, 3), 1: DecodeConfig(4, 4)}  # by KV element bytes
CONFIGS = ("w2s3", "w3s3", "w4s2", "w4s3", "w4s4")  # what the benchmark compares


def parse_config(text: str) -> DecodeConfig:
    """`w<warps>s<stages>`, e.g. w4s2; ValueError naming HEADRACE_DECODE_CONFIG if not."""
    m = re.fullmatch(r"w(\d+)s(\d+)", text.strip().lower())
    if m is None:
        raise ValueError(f"{CONFIG_ENV} must look like w4s2 (warps, stages), got {text!r}")
    cfg = DecodeConfig(int(m.group(1)), int(m.group(2)))
    if not (1 <= cfg.warps <= 16 and 2 <= cfg.stages <= 8):
        raise ValueError(f"{CONFIG_ENV}: 1-16 warps and 2-8 stages, got {text!r}")
    return cfg


def config_for(kv_bytes: int, pairs: int | None = None, num_sms: int = 0) -> DecodeConfig:
    """HEADRACE_DECODE_CONFIG's variant if set (read at each call), else with
    HEADRACE_DECODE_PLAN=v3 and the grid's blocks per split (`pairs`) decode_plan3's pick,
    else the default."""
    text = os.environ.get(CONFIG_ENV, "").strip()
    if text:
        return parse_config(text)
    if pairs is not None and plan3():
        return DecodeConfig(*decode_plan3.pick(kv_bytes, pairs, num_sms))
    return DEFAULT_CONFIGS[kv_bytes]


def plan3() -> bool:
    """HEADRACE_DECODE_PLAN: `v3` (the default since the H200 ranked it best or within 0.2
    points in every cell, session 8: decode_plan3, the variant by batch, splits of two
    pipelines at least) or `v2` (one variant per KV type, 128-token splits)."""
    value = os.environ.get(PLAN_ENV, "v3").strip().lower() or "v3"
    if value not in ("v2", "v3"):
        raise ValueError(f"{PLAN_ENV} must be v2 or v3, got {value!r}")
    return value == "v3"


def fp8_math_half() -> bool:
    """HEADRACE_DECODE_FP8_MATH: `f16` (the default, best with v3 in 6 of 7 FP8 cells on the
    H200: decode_tc_fp8h, fp16 mma, one conversion per KV pair instead of four on bf16) or
    `auto` (FP8 KV widened to the model's dtype)."""
    value = os.environ.get(FP8_MATH_ENV, "f16").strip().lower() or "f16"
    if value not in ("auto", "f16"):
        raise ValueError(f"{FP8_MATH_ENV} must be auto or f16, got {value!r}")
    return value == "f16"


@dataclass(frozen=True)
class DecodePlan:
    splits: int  # grid width: the most splits any request may use
    min_chunk: int  # tokens: the shortest split the device cuts a request into
    blocks: int  # blocks with work when every request is at the bound
    slots: int  # blocks resident on the GPU at once (the wave size)
    config: DecodeConfig | None = None  # the variant it was planned for (plan_for sets it)

    @property
    def merge(self) -> bool:
        """Whether a request may have several splits to merge (if not: no counters, no merge
        kernel)."""
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


def module_defines(
    dtype: torch.dtype,
    head_dim: int,
    config: DecodeConfig | None = None,
    merge3: bool | None = None,
) -> dict[str, int | str]:
    """Macros of one compiled module (the KV type is a template parameter inside it);
    merge3 (None: whether HEADRACE_DECODE_PLAN=v3) compiles v3's fused merge."""
    cfg = config or DEFAULT_CONFIGS[2]
    defines: dict[str, int | str] = {
        "HR_BF16": int(dtype == torch.bfloat16),
        "HR_HEAD_DIM": head_dim,
        "HR_DECODE_WARPS": cfg.warps,
        "HR_DECODE_STAGES": cfg.stages,
    }
    if plan3() if merge3 is None else merge3:
        defines["HR_DECODE_MERGE3"] = 1
    return defines


def kernel_name(kv_fp8: bool) -> str:
    if kv_fp8:
        return "decode_tc_fp8h" if fp8_math_half() else "decode_tc_fp8"
    return "decode_tc"


def _kv_bytes(name: str) -> int:
    return 1 if "fp8" in name else 2


def _kernel(dtype: torch.dtype, head_dim: int, name: str, cfg: DecodeConfig) -> object:
    """Kernel `name` of the module compiled for variant `cfg` (the merge's does not matter)."""
    mod = compiler.load_module(
        source(), defines=module_defines(dtype, head_dim, cfg), name="decode_attention"
    )
    kernel = mod.kernel(name)
    if name != "decode_tc_merge":
        _allow_smem(kernel, cfg.smem_bytes(head_dim, _kv_bytes(name)))
    return kernel


def _allow_smem(kernel: Any, nbytes: int) -> None:
    """Opt the kernel in to `nbytes` of dynamic shared memory and the largest carveout
    (compiler.allow_shared_memory), after checking the variant fits sm_90's limit."""
    if nbytes > SMEM_LIMIT:
        raise ValueError(f"{CONFIG_ENV}: {nbytes} bytes of shared memory (> {SMEM_LIMIT})")
    compiler.allow_shared_memory(
        kernel, max(nbytes, STATIC_SMEM_LIMIT), torch.cuda.current_device()
    )


def _slots_per_sm(kernel: object, device: torch.device, key: str) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _slots.get((idx, key))
    if n is None:
        _, dim, variant, name = key.split("-")  # as _key writes it
        cfg, head_dim, kv_bytes = parse_config(variant), int(dim), _kv_bytes(name)
        n = compiler.blocks_per_sm(kernel, cfg.threads, cfg.smem_bytes(head_dim, kv_bytes))
        _slots[(idx, key)] = n
    return n


def _key(dtype: torch.dtype, head_dim: int, name: str, cfg: DecodeConfig) -> str:
    """Occupancy cache key: dtype, head_dim, variant, kernel (the variant may change with
    HEADRACE_DECODE_CONFIG between calls)."""
    return f"{dtype}-{head_dim}-{cfg.name}-{name}"


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
    """plan_decode with this GPU's SM count and the kernel's occupancy (compiles if needed),
    for the variant config_for picks; with HEADRACE_DECODE_PLAN=v3, decode_plan3's splits."""
    from cuda.paged_attention_kernels import num_sms

    sms, name = num_sms(device), kernel_name(kv_fp8)
    pairs = batch * num_kv_heads * math.ceil(group / HEADS_PER_BLOCK)
    cfg = config_for(_kv_bytes(name), pairs, sms)
    kernel = _kernel(dtype, head_dim, name, cfg)
    per_sm = _slots_per_sm(kernel, device, _key(dtype, head_dim, name, cfg))
    plan = plan_decode(batch, num_kv_heads, group, max_seq_len, sms, per_sm)
    if plan3():
        plan = replace(plan, min_chunk=decode_plan3.min_chunk(plan.splits, cfg.warps, cfg.stages))
    return replace(plan, config=cfg)


def fused_merge() -> bool:
    """Whether the last split of each request merges (HEADRACE_DECODE_FUSED_MERGE, default
    1) rather than a second kernel: in a CUDA graph the merge kernel costs its launch even
    when every request fits one split (2.6 us a layer in W1's profile)."""
    value = os.environ.get(FUSED_MERGE_ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", ""):
        raise ValueError(f"{FUSED_MERGE_ENV} must be 0 or 1, got {value!r}")
    return value not in ("0", "false")


def merge_counters(device: torch.device, need: int) -> int:
    """Device address of `need` zeroed int32 merge counters (the kernel leaves them zero),
    or 0 if none can be had now (graph capture before any eager call allocated them): the
    caller then launches the merge kernel."""
    key = str(device)
    t = _counters.get(key)
    if t is None or t.numel() < need:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return 0
        if t is not None:
            _old_counters.append(t)
        t = torch.zeros(max(need, COUNTERS), dtype=torch.int32, device=device)
        _counters[key] = t
    return t.data_ptr()


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
    """The decode kernel; if the plan has several splits, its last split per request merges
    them (fused_merge), else the merge kernel does.

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
    name = kernel_name(kv_fp8)
    cfg = plan.config or config_for(_kv_bytes(name))
    shmem = cfg.smem_bytes(head_dim, _kv_bytes(name))
    kernel = _kernel(q.dtype, head_dim, name, cfg)
    counters = merge_counters(q.device, grid[1] * batch) if plan.merge and fused_merge() else 0
    args = (*common, part_o, part_lse, *heads, min_chunk, counters)
    compiler.launch(kernel, grid, cfg.threads, *args, shmem=shmem)
    if plan.merge and not counters:
        compiler.launch(
            _kernel(q.dtype, head_dim, "decode_tc_merge", cfg),
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
