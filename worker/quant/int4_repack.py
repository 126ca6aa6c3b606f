"""AWQ and GPTQ tensors -> the kernels' layout (cuda/int4_gemm.py's Int4Weight), once at load.

    ours  qw      int32 [N, K / 8]   nibble j of word (n, w) = input 8w + j of channel n
          scales  fp16  [N, G]
          zeros   uint8 [N, G]       zero points (GPTQ: its stored zero - 1, plus one: 1..16)
          perm    int64 [K] | None   desc_act: x[:, perm] puts the inputs in group order

GPTQ's qweight word (r, n) already holds inputs 8r .. 8r+7 of channel n in our nibble
order, so without act order it is a transpose; AWQ packs along N in its interleaved order
and is unpacked and repacked along K. Output-major rows are also what makes fused layers
simple: a q/k/v or gate/up shard is a row slice of qw, scales and zeros, exactly as it is
of a 16-bit weight, and Falcon's / GPT-NeoX's q/k/v row reorder applies to them unchanged.

`check_parts` validates a shard's tensors against the layer's shape, naming the tensor.
"""

from __future__ import annotations

import torch

from cuda.int4_gemm import Int4Weight
from worker.quant.int4 import AWQ_ORDER, PACK, Int4Config

PARTS = {"awq": ("qweight", "qzeros", "scales"), "gptq": ("qweight", "qzeros", "scales", "g_idx")}


def expected_shapes(cfg: Int4Config, in_f: int, out_f: int) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor shapes for a [out_f, in_f] linear layer."""
    groups = cfg.num_groups(in_f)
    if cfg.method == "awq":
        return {
            "qweight": (in_f, out_f // PACK),
            "qzeros": (groups, out_f // PACK),
            "scales": (groups, out_f),
        }
    return {
        "qweight": (in_f // PACK, out_f),
        "qzeros": (groups, out_f // PACK),
        "scales": (groups, out_f),
        "g_idx": (in_f,),
    }


def check_parts(
    parts: dict[str, torch.Tensor], cfg: Int4Config, in_f: int, out_f: int, prefix: str
) -> None:
    """ValueError naming the tensor whose shape or dtype does not fit the layer."""
    if out_f % PACK:
        raise ValueError(
            f"{prefix}: {out_f} output channels is not a multiple of {PACK} "
            f"({cfg.method} packs {PACK} 4-bit values per int32)"
        )
    shapes = expected_shapes(cfg, in_f, out_f)
    for part, t in parts.items():
        if part in ("qweight", "qzeros") and t.dtype != torch.int32:
            raise ValueError(f"{prefix}.{part} has dtype {t.dtype}, expected torch.int32")
        if part == "scales" and not t.dtype.is_floating_point:
            raise ValueError(f"{prefix}.scales has dtype {t.dtype}, expected float16")
        if part == "g_idx" and t.dtype.is_floating_point:
            raise ValueError(f"{prefix}.g_idx has dtype {t.dtype}, expected int32")
        if tuple(t.shape) != shapes[part]:
            raise ValueError(
                f"{prefix}.{part} has shape {tuple(t.shape)}, expected {shapes[part]} "
                f"(in_features {in_f}, out_features {out_f}, group_size {cfg.group_size})"
            )


def unpack_cols(words: torch.Tensor, order: tuple[int, ...] | range) -> torch.Tensor:
    """int32 [R, C / 8] -> uint8 [R, C], nibble p of word (r, j) = column 8j + order[p]."""
    r, c8 = words.shape
    out = torch.empty(r, c8, PACK, dtype=torch.uint8, device=words.device)
    for p, col in enumerate(order):
        out[:, :, col] = ((words >> (4 * p)) & 0xF).to(torch.uint8)
    return out.view(r, c8 * PACK)


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] 0..15 -> int32 [N, K / 8], nibble j of word w = column 8w + j (int64
    words while packing: a shift into bit 31 of an int32 would overflow)."""
    n, k = values.shape
    v = values.view(n, k // PACK, PACK)
    words = torch.zeros(n, k // PACK, dtype=torch.int64, device=values.device)
    for j in range(PACK):
        words |= v[:, :, j].to(torch.int64) << (4 * j)
    words -= (words >= 2**31).to(torch.int64) << 32
    return words.to(torch.int32)


def awq_to_rows(parts: dict[str, torch.Tensor], cfg: Int4Config) -> Int4Weight:
    q = unpack_cols(parts["qweight"], AWQ_ORDER)  # [K, N]
    z = unpack_cols(parts["qzeros"], AWQ_ORDER)  # [G, N]
    in_f = q.shape[0]
    return Int4Weight(
        qw=pack_rows(q.t().contiguous()),
        scales=parts["scales"].t().to(torch.float16).contiguous(),
        zeros=z.t().contiguous(),
        group_size=cfg.group_for(in_f),
    )


def gptq_to_rows(parts: dict[str, torch.Tensor], cfg: Int4Config, prefix: str) -> Int4Weight:
    qweight = parts["qweight"]  # [K / 8, N]
    in_f = qweight.shape[0] * PACK
    group = cfg.group_for(in_f)
    z = unpack_cols(parts["qzeros"], range(PACK)) + 1  # stored zero - 1
    perm = None
    g_idx = parts.get("g_idx")
    if g_idx is not None:
        perm = group_order(g_idx, cfg, in_f, prefix)
    qw = qweight.t().contiguous()  # our word (n, r) = GPTQ's word (r, n)
    if perm is not None:
        qw = pack_rows(unpack_cols(qw, range(PACK))[:, perm].contiguous())
    return Int4Weight(
        qw=qw,
        scales=parts["scales"].t().to(torch.float16).contiguous(),
        zeros=z.t().contiguous(),
        group_size=group,
        perm=perm,
    )


def group_order(
    g_idx: torch.Tensor, cfg: Int4Config, in_f: int, prefix: str
) -> torch.Tensor | None:
    """The input order that makes g_idx's groups contiguous (None: already in row order).
    Every group must hold group_size rows, as GPTQ's act order writes them."""
    g = g_idx.to(torch.int64)
    groups = cfg.num_groups(in_f)
    if int(g.min()) < 0 or int(g.max()) >= groups:
        raise ValueError(f"{prefix}.g_idx has group ids outside [0, {groups})")
    rows = torch.arange(in_f, device=g.device) // cfg.group_for(in_f)
    if torch.equal(g, rows):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], rows):
        raise ValueError(
            f"{prefix}.g_idx: groups do not each hold group_size {cfg.group_size} input rows"
        )
    if not cfg.desc_act:
        raise ValueError(
            f"{prefix}.g_idx is not in row order but quantization_config.desc_act is false"
        )
    return perm


def to_rows(parts: dict[str, torch.Tensor], cfg: Int4Config, prefix: str) -> Int4Weight:
    """One checkpoint module's tensors (already checked) in the kernels' layout."""
    if cfg.method == "awq":
        return awq_to_rows(parts, cfg)
    return gptq_to_rows(parts, cfg, prefix)
