"""4-bit weight formats: AWQ (GEMM version) and GPTQ, read from their definitions.

Both store a linear layer y = x W^T (W: [out, in]) as 4-bit integers q, per-group fp16
scales s and 4-bit zero points z, with W[o, i] = (q[o, i] - z[g(i), o]) * s[g(i), o], where
g(i) is input row i's group (in // group_size groups; GPTQ may permute them, see g_idx).
They differ in how the 4-bit values are packed into int32 words::

    AWQ  qweight int32 [in, out / 8]      word (i, j) holds columns 8j .. 8j+7 of row i,
         qzeros  int32 [groups, out / 8]  nibble k (bits 4k..4k+3) = column 8j + AWQ_ORDER[k]
         scales  fp16  [groups, out]      zero points as stored

    GPTQ qweight int32 [in / 8, out]      word (r, o) holds rows 8r .. 8r+7 of column o,
                                          nibble k = row 8r + k
         qzeros  int32 [groups, out / 8]  nibble k of word (g, j) = column 8j + k, stored as
                                          zero - 1 (AutoGPTQ's checkpoint format; sym: 7)
         scales  fp16  [groups, out]
         g_idx   int32 [in]               group of each input row (desc_act: not sorted)

GPTQModel's checkpoint_format "gptq_v2" stores the zero points as they are (no - 1).

`Int4Config.from_hf` reads `quantization_config`; `dequantize_awq` / `dequantize_gptq` give
W in the model's dtype: the CPU reference path (dequantize once, then matmul) and what
the GPU kernels are tested against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column AWQ_ORDER[k]
PACK = 8  # 4-bit values per int32


@dataclass(frozen=True)
class Int4Config:
    """A checkpoint's 4-bit quantization settings."""

    method: str  # "awq" or "gptq"
    group_size: int  # input rows per scale group; -1: one group for all rows
    zero_point: bool  # AWQ: asymmetric with zeros; GPTQ: not sym
    desc_act: bool  # GPTQ: groups follow g_idx (activation order), not row order
    modules_to_not_convert: tuple[str, ...] = ()  # AWQ: substrings of module names
    # GPTQ's checkpoint_format "gptq" (AutoGPTQ) stores each zero point minus one;
    # "gptq_v2" (GPTQModel) stores it as it is, as AWQ does.
    zeros_minus_one: bool = True
    lm_head: bool = False  # GPTQ lm_head true: the LM head is 4-bit in the checkpoint too
    # GPTQModel's `dynamic` patterns, in order: (regex, skip); the first that matches a
    # module decides: skip (a "-:" pattern) leaves it unquantized.
    dynamic: tuple[tuple[str, bool], ...] = ()

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> Int4Config:
        """From config.json's quantization_config; ValueError names the field that is off."""
        method = str(qc.get("quant_method", "")).lower()
        if method not in ("awq", "gptq"):
            raise ValueError(f"quantization_config.quant_method {method!r} is not awq or gptq")
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise ValueError(f"quantization_config.bits is {bits!r}: only 4-bit is supported")
        group = qc.get("group_size", qc.get("q_group_size"))
        if not isinstance(group, int) or not (group == -1 or group > 0):
            raise ValueError(f"quantization_config.group_size {group!r} must be > 0 or -1")
        return _awq(qc, group) if method == "awq" else _gptq(qc, group)

    @classmethod
    def for_dummy(cls, method: str, in_features: tuple[int, ...] = ()) -> Int4Config:
        """The settings random (dummy) weights get with --quantization awq|gptq and no
        quantization_config: the common published ones (group 128; AWQ zero points,
        GPTQ symmetric, no activation order); a smaller group (64, 32, 8) when 128 does
        not divide every layer's in_features (tiny test models)."""
        group = next(g for g in (128, 64, 32, 8) if all(k % g == 0 for k in in_features))
        if method == "awq":
            return cls("awq", group, zero_point=True, desc_act=False)
        return cls("gptq", group, zero_point=False, desc_act=False)

    def group_for(self, in_features: int) -> int:
        """group_size, with -1 (one group) resolved to in_features."""
        return in_features if self.group_size == -1 else self.group_size

    def is_ignored(self, module: str) -> bool:
        """module: a checkpoint module name ('model.layers.0.mlp.down_proj'). AWQ's
        modules_to_not_convert match as substrings of the name, as AutoAWQ matches them;
        GPTQModel's dynamic patterns from the start of it (re.match), first match wins."""
        if any(key in module for key in self.modules_to_not_convert):
            return True
        for pattern, skip in self.dynamic:
            if re.match(pattern, module):
                return skip
        return False

    def describe(self) -> str:
        zp = "zero points" if self.zero_point else "symmetric"
        act = ", act order" if self.desc_act else ""
        return f"int4 {self.method}, group {self.group_size}, {zp}{act}"

    def num_groups(self, in_features: int) -> int:
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise ValueError(
                f"in_features {in_features} is not a multiple of group_size {self.group_size}"
            )
        return in_features // self.group_size


def _awq(qc: dict[str, Any], group: int) -> Int4Config:
    # AutoAWQ's versions: "gemm" packs qweight [in, out / 8] (what we read); "gemv" /
    # "gemv_fast" pack along the input and "marlin" is Marlin's tile order.
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(
            f"quantization_config.version {version!r}: only AWQ's GEMM packing is supported"
        )
    skip = qc.get("modules_to_not_convert") or ()
    if not isinstance(skip, list | tuple) or not all(isinstance(m, str) for m in skip):
        raise ValueError("quantization_config.modules_to_not_convert must be a list of names")
    # zero_point false changes how AutoAWQ searches scales, not the GEMM storage: qzeros
    # is still written and read (as vLLM reads it); a file without it is refused by name.
    return Int4Config(
        "awq",
        group,
        zero_point=bool(qc.get("zero_point", True)),
        desc_act=False,
        modules_to_not_convert=tuple(skip),
    )


def _gptq(qc: dict[str, Any], group: int) -> Int4Config:
    if qc.get("is_marlin_format"):  # AutoGPTQ's older flag for Marlin-packed checkpoints
        raise ValueError(
            "quantization_config.is_marlin_format true: Marlin packing is not supported"
        )
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(
            f"quantization_config.checkpoint_format {fmt!r}: only 'gptq' (zeros stored - 1) "
            "and 'gptq_v2' (zeros as they are)"
        )
    sym, desc_act = qc.get("sym", True), qc.get("desc_act", False)
    lm_head = qc.get("lm_head", False)
    for key, value in (("sym", sym), ("desc_act", desc_act), ("lm_head", lm_head)):
        if not isinstance(value, bool):
            raise ValueError(f"quantization_config.{key} must be true or false, got {value!r}")
    base = {"bits": 4, "group_size": group, "sym": sym, "desc_act": desc_act}
    return Int4Config(
        "gptq",
        group,
        zero_point=not sym,
        desc_act=desc_act,
        zeros_minus_one=fmt == "gptq",
        lm_head=lm_head,
        dynamic=_dynamic(qc.get("dynamic"), base),
    )


def _dynamic(dyn: Any, base: dict[str, Any]) -> tuple[tuple[str, bool], ...]:
    """GPTQModel's per-module overrides: {"-:regex": {}} leaves matching modules 16-bit;
    "+:regex" (or a bare regex) overrides the base settings for them, which we can hold
    only when it changes none of them (one layout per model)."""
    if dyn is None:
        return ()
    if not isinstance(dyn, dict):
        raise ValueError("quantization_config.dynamic must be an object of regex: settings")
    out = []
    for pattern, override in dyn.items():
        if pattern.startswith("-:"):
            out.append((pattern[2:], True))
            continue
        changed = {k: v for k, v in (override or {}).items() if k in base and base[k] != v}
        if changed:
            raise ValueError(
                f"quantization_config.dynamic[{pattern!r}] sets {changed}: per-module "
                "settings that differ from the base ones are not supported (only '-:' "
                "patterns, which leave modules unquantized)"
            )
        out.append((pattern.removeprefix("+:"), False))
    return tuple(out)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] int32 -> [..., n, 8] values 0..15, nibble k at index k."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ words [R, C / 8] -> values [R, C] in column order."""
    nib = _nibbles(packed)  # [R, C/8, 8], nibble k = column AWQ_ORDER[k]
    inverse = torch.tensor([AWQ_ORDER.index(c) for c in range(PACK)], device=packed.device)
    return nib[..., inverse].reshape(packed.shape[0], -1)


def unpack_gptq_rows(packed: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight [R / 8, C] -> [R, C]: nibble k of word (r, c) is row 8r + k."""
    nib = _nibbles(packed)  # [R/8, C, 8]
    return nib.permute(0, 2, 1).reshape(-1, packed.shape[1])


def unpack_gptq_cols(packed: torch.Tensor) -> torch.Tensor:
    """GPTQ qzeros [G, C / 8] -> [G, C]: nibble k of word (g, j) is column 8j + k."""
    return _nibbles(packed).reshape(packed.shape[0], -1)


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")


def dequantize_awq(
    qweight: torch.Tensor,  # int32 [in, out / 8]
    qzeros: torch.Tensor,  # int32 [groups, out / 8]
    scales: torch.Tensor,  # fp16 [groups, out]
    cfg: Int4Config,
    dtype: torch.dtype,
    prefix: str = "",
) -> torch.Tensor:
    """W [out, in] in `dtype`."""
    in_features, out_features = qweight.shape[0], qweight.shape[1] * PACK
    groups = cfg.num_groups(in_features)
    _check(f"{prefix}qzeros", qzeros, (groups, out_features // PACK))
    _check(f"{prefix}scales", scales, (groups, out_features))
    q = unpack_awq(qweight)  # [in, out]
    z = unpack_awq(qzeros)
    g = torch.arange(in_features, device=q.device) // cfg.group_for(in_features)
    w = (q - z[g]).to(torch.float32) * scales[g].to(torch.float32)
    return w.t().contiguous().to(dtype)


def dequantize_gptq(
    qweight: torch.Tensor,  # int32 [in / 8, out]
    qzeros: torch.Tensor,  # int32 [groups, out / 8]
    scales: torch.Tensor,  # fp16 [groups, out]
    g_idx: torch.Tensor | None,  # int32 [in]
    cfg: Int4Config,
    dtype: torch.dtype,
    prefix: str = "",
) -> torch.Tensor:
    """W [out, in] in `dtype`."""
    in_features, out_features = qweight.shape[0] * PACK, qweight.shape[1]
    groups = cfg.num_groups(in_features)
    _check(f"{prefix}qzeros", qzeros, (groups, out_features // PACK))
    _check(f"{prefix}scales", scales, (groups, out_features))
    if g_idx is None:
        if cfg.desc_act:
            raise ValueError(f"{prefix}g_idx is missing but desc_act is true")
        size = in_features if cfg.group_size == -1 else cfg.group_size
        g = torch.arange(in_features, device=qweight.device) // size
    else:
        _check(f"{prefix}g_idx", g_idx, (in_features,))
        g = g_idx.long()
        if int(g.min()) < 0 or int(g.max()) >= groups:
            raise ValueError(f"{prefix}g_idx has group ids outside [0, {groups})")
    q = unpack_gptq_rows(qweight)  # [in, out]
    z = unpack_gptq_cols(qzeros) + int(cfg.zeros_minus_one)  # v1 stores zero - 1
    w = (q - z[g]).to(torch.float32) * scales[g].to(torch.float32)
    return w.t().contiguous().to(dtype)
