"""Copying checkpoint tensors into a model, whatever the family's names and fusions.

Each model lists every tensor it expects as {checkpoint name: Target}: which parameter it
goes to, where inside it (a row slice of a fused projection, an expert of a stacked
expert tensor), and, for fused q/k/v checkpoints laid out per head, how its rows reorder
into our q | k | v layout. `load_checkpoint` streams the tensors one at a time, and names
what is unexpected, misshapen or missing in checkpoint terms.

FP8 (worker/quant/): an Fp8Linear's `X.weight` is copied as is when float8, else
quantized per output channel on the way (which fills its rows of `weight_scale`);
`X.weight_scale` holds one value (per tensor, broadcast to the shard's rows) or one per
row; `X.input_scale` (static activations) keeps the largest over fused shards. KV cache
scales set the attention module's k_scale / v_scale. A float8 weight of a layer we keep
16-bit (Mixtral's experts, a router, a quantized LM head) is dequantized on load with its
weight_scale. `scale_targets` adds these entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from worker.quant.fp8 import FP8, Fp8Linear, quantize_weight_per_channel
from worker.quant.int4_load import Int4Assembler

Index = tuple[int | slice, ...]


@dataclass(frozen=True)
class Target:
    param: str  # our parameter name, e.g. "layers.3.self_attn.qkv_proj.weight"
    index: Index = ()  # where in the parameter the tensor goes: param.data[index]
    rows: torch.Tensor | None = None  # reorder the checkpoint's rows: ours = tensor[rows]
    # "param": a copy (an Fp8Linear weight: float8 as is, 16/32-bit quantized on the way);
    # "weight_scale" / "input_scale": an Fp8Linear's scales; "kv_scale": an attention
    # module's k_scale / v_scale attribute (param names the attribute); "zero_point": an
    # FP8 layer's zero points, accepted only if zero (symmetric FP8); "fp8_dequant": the
    # weight_scale of a float8 weight that a 16-bit parameter takes dequantized; "int4" /
    # "int4_dequant": an AWQ / GPTQ part (worker/quant/int4_load.py; param names the layer).
    kind: str = "param"
    optional: bool = False  # the checkpoint may leave it out


def load_checkpoint(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    source: str,
    targets: dict[str, Target],
    skip: Callable[[str], bool],
) -> None:
    """Copy each (name, tensor) into place; raise ValueError naming the file and tensor."""
    loader = _Loader(model, source, targets)
    for name, tensor in weights:
        if not skip(name):
            loader.add(name, tensor)
    missing = [n for n, t in targets.items() if not t.optional and n not in loader.loaded]
    if missing:
        shown = ", ".join(missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{source}: checkpoint is missing tensors: {shown}{more}")
    loader.finish()
    if loader.int4 is not None:
        loader.int4.finish()


def scale_targets(model: nn.Module, targets: dict[str, Target]) -> dict[str, Target]:
    """The FP8 entries that go with a model's weight targets: each Fp8Linear weight's
    `weight_scale` (same rows as the weight) and `input_scale` (required for static
    activations), and every attention module's optional KV cache scales (`k_scale` /
    `v_scale`, or the older `k_proj.output_scale`) beside its fused q/k/v."""
    out: dict[str, Target] = {}
    fp8_file = getattr(getattr(model, "quant_scheme", None), "checkpoint_fp8", False)
    for name, t in targets.items():
        if fp8_file and t.kind == "param" and name.endswith(".weight"):
            out |= _dequant_scale_targets(model, name, t)
        if t.kind != "param" or not (name.endswith(".weight") and t.param.endswith(".weight")):
            continue
        module = model.get_submodule(t.param.removesuffix(".weight"))
        if isinstance(module, Fp8Linear):
            src, dst = name.removesuffix("weight"), t.param.removesuffix("weight")
            out[src + "weight_scale"] = Target(
                dst + "weight_scale", t.index, t.rows, "weight_scale"
            )
            static = module.input_scale is not None
            out[src + "input_scale"] = Target(
                dst + "input_scale", (), None, "input_scale", not static
            )
            # Symmetric FP8 has no zero points; some compressed-tensors writers still save
            # them (all zero). Accepted when zero, refused by name otherwise.
            for zp in ("weight_zero_point", "input_zero_point"):
                out[src + zp] = Target(dst + zp, kind="zero_point", optional=True)
        if t.param.endswith(".self_attn.qkv_proj.weight"):
            attn_src = name.rsplit(".", 2)[0]  # the checkpoint's attention module
            attn = t.param.removesuffix(".qkv_proj.weight")
            for kv in "kv":
                dst = f"{attn}.{kv}_scale"
                for src in (f"{kv}_scale", f"attn.{kv}_scale", f"{kv}_proj.output_scale"):
                    out[f"{attn_src}.{src}"] = Target(dst, kind="kv_scale", optional=True)
            # The older single kv_scale sets both (vLLM reads it so, as deprecated).
            for src in ("kv_scale", "attn.kv_scale"):
                out[f"{attn_src}.{src}"] = Target(
                    f"{attn}.kv_scale", kind="kv_scale", optional=True
                )
    return out


def _dequant_scale_targets(model: nn.Module, name: str, t: Target) -> dict[str, Target]:
    """An FP8 checkpoint may quantize a layer we keep 16-bit (Mixtral's stacked experts,
    a router, an LM head its ignore list leaves out): such a float8 weight is dequantized
    on load with its weight_scale (optional: 16-bit layers have none)."""
    param = t.param.removesuffix(".weight")
    try:
        if isinstance(model.get_submodule(param), Fp8Linear):
            return {}
    except AttributeError:
        pass  # a stacked parameter (experts), not a module's weight
    src = name.removesuffix("weight")
    out = {src + "weight_scale": Target(t.param, t.index, t.rows, "fp8_dequant", True)}
    out[src + "input_scale"] = Target(f"{param}#input_scale", kind="input_scale", optional=True)
    for zp in ("weight_zero_point", "input_zero_point"):
        out[src + zp] = Target(f"{param}#{zp}", kind="zero_point", optional=True)
    return out


QUANT_PARTS: tuple[str, ...] = ("qweight", "qzeros", "scales", "g_idx", "weight_scale")
QUANT_PARTS += ("input_scale", "weight_packed", "weight_shape", "weight_zero_point")


def _hint(name: str, model: nn.Module) -> str:
    """Why a quantized-looking tensor may be unexpected: the model was not built for it."""
    if name.rpartition(".")[2] not in QUANT_PARTS:
        return ""
    if getattr(model, "quant_scheme", None) is None:
        return " (a quantized tensor, but config.json has no quantization_config)"
    return " (a quantized tensor of a layer the quantization_config leaves 16-bit)"


class _Loader:
    def __init__(self, model: nn.Module, source: str, targets: dict[str, Target]) -> None:
        self.model = model
        self.source = source
        self.targets = targets
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.loaded: set[str] = set()  # checkpoint names
        self.started: set[str] = set()  # input_scale parameters given a first value
        self.int4: Int4Assembler | None = None  # AWQ / GPTQ parts, made on the first one
        # float8 weights of 16-bit layers and their weight_scale, by checkpoint module,
        # until both are there (_dequant_scale_targets)
        self.dequant: dict[str, dict[str, tuple[str, Target, torch.Tensor]]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        target = self.targets.get(name)
        if target is not None and target.kind == "kv_scale":
            self._kv_scale(name, target, tensor)
            return
        if target is not None and target.kind == "zero_point":
            if bool((tensor != 0).any()):
                raise ValueError(
                    f"{self.source}: tensor {name!r} holds nonzero zero points; FP8 "
                    "weights and activations are symmetric (quantization_config "
                    "symmetric: true)"
                )
            self.loaded.add(name)
            return
        if target is not None and target.kind in ("int4", "int4_dequant"):
            if self.int4 is None:
                self.int4 = Int4Assembler(self.model, self.source, self.params)
            self.int4.add(name, target, tensor)
            self.loaded.add(name)
            return
        if target is not None and target.kind == "fp8_dequant":
            self._dequant_part(name, "scale", target, tensor)
            return
        param = self.params.get(target.param) if target is not None else None
        if target is None or (param is None and target.kind != "input_scale"):
            raise ValueError(
                f"{self.source}: unexpected tensor {name!r} in checkpoint{_hint(name, self.model)}"
            )
        self.loaded.add(name)
        if param is None:  # input_scale of a dynamic-activation layer: not used
            return
        dst = param.data[target.index] if target.index else param.data
        if target.kind == "weight_scale":
            self._weight_scale(name, target, dst, tensor)
        elif target.kind == "input_scale":
            self._input_scale(name, target, dst, tensor)
        elif param.dtype == FP8:
            self._fp8_weight(name, target, dst, tensor)
        else:
            if tensor.dtype == FP8 and name.removesuffix("weight") + "weight_scale" in self.targets:
                self._dequant_part(name, "weight", target, tensor)
                return
            if tensor.dtype == FP8:
                raise ValueError(
                    f"{self.source}: tensor {name!r} is float8 but its layer is not quantized "
                    "(the lm_head, a router, or in quantization_config's ignore list)"
                )
            self._copy(name, dst, tensor if target.rows is None else tensor[target.rows])

    def _dequant_part(self, name: str, part: str, target: Target, tensor: torch.Tensor) -> None:
        module = name.rpartition(".")[0]
        parts = self.dequant.setdefault(module, {})
        parts[part] = (name, target, tensor)
        self.loaded.add(name)
        if len(parts) < 2:
            return
        del self.dequant[module]
        w_name, t, q = parts["weight"]
        s = parts["scale"][2].float()
        w = q.float() * (s.reshape(-1, 1) if s.numel() > 1 else s.reshape(()))
        param = self.params[t.param].data
        dst = param[t.index] if t.index else param
        self._copy(w_name, dst, w if t.rows is None else w[t.rows])

    def finish(self) -> None:
        """A float8 weight without its scale, or a scale without a float8 weight."""
        for module, parts in self.dequant.items():
            if "weight" in parts:
                raise ValueError(
                    f"{self.source}: checkpoint is missing tensors: {module}.weight_scale "
                    f"(the scale of float8 {module}.weight)"
                )
            raise ValueError(
                f"{self.source}: tensor '{module}.weight_scale' belongs to a weight that is "
                "not float8"
            )

    def _check_shape(self, name: str, dst: torch.Tensor, tensor: torch.Tensor) -> None:
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{self.source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(dst.shape)}"
            )

    def _copy(self, name: str, dst: torch.Tensor, tensor: torch.Tensor) -> None:
        self._check_shape(name, dst, tensor)
        dst.copy_(tensor)

    def _fp8_weight(
        self, name: str, target: Target, dst: torch.Tensor, tensor: torch.Tensor
    ) -> None:
        src = tensor if target.rows is None else tensor[target.rows]
        if src.dtype == FP8:
            self._copy(name, dst, src)
            return
        scheme = getattr(self.model, "quant_scheme", None)
        if getattr(scheme, "checkpoint_fp8", False):
            # Quantizing it here would apply the checkpoint's weight_scale on top.
            raise ValueError(
                f"{self.source}: tensor {name!r} is {src.dtype}, but quantization_config says "
                "the checkpoint's linear weights are float8_e4m3fn (add the module to its "
                "ignore list if it was left unquantized)"
            )
        # Quantize on load, per output channel (each fused shard's rows stand alone); this
        # also fills the rows' weight_scale.
        self._check_shape(name, dst, src)
        wq, scales = quantize_weight_per_channel(src.to(dst.device))
        dst.copy_(wq)
        scale = self.params[target.param.removesuffix("weight") + "weight_scale"].data
        (scale[target.index] if target.index else scale).copy_(scales)
        self.loaded.add(name.removesuffix("weight") + "weight_scale")

    def _weight_scale(
        self, name: str, target: Target, dst: torch.Tensor, tensor: torch.Tensor
    ) -> None:
        s = tensor.float().reshape(-1)
        if s.numel() not in (1, dst.numel()):
            raise ValueError(
                f"{self.source}: tensor {name!r} has {s.numel()} scales; expected 1 "
                f"(per tensor) or {dst.numel()} (per channel)"
            )
        if s.numel() > 1 and target.rows is not None:
            s = s[target.rows]
        dst.copy_(s.to(dst.device).expand(dst.numel()))

    def _input_scale(
        self, name: str, target: Target, dst: torch.Tensor, tensor: torch.Tensor
    ) -> None:
        """Fused shards keep the largest input_scale, as vLLM does."""
        if tensor.numel() != 1:
            raise ValueError(f"{self.source}: tensor {name!r} must hold one scale")
        new = tensor.float().reshape(1).to(dst.device)
        first = target.param not in self.started  # uninitialized (to_empty) until then
        self.started.add(target.param)
        dst.copy_(new if first else torch.maximum(dst, new))

    def _kv_scale(self, name: str, target: Target, tensor: torch.Tensor) -> None:
        value = float(tensor.float().max())
        if not value > 0:
            raise ValueError(f"{self.source}: tensor {name!r} must be > 0, got {value}")
        module_name, _, attr = target.param.rpartition(".")
        module = self.model.get_submodule(module_name)
        for a in ("k_scale", "v_scale") if attr == "kv_scale" else (attr,):
            setattr(module, a, value)
        self.loaded.add(name)


def qkv_rows(layout: str, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor | None:
    """Indices that reorder a fused query_key_value's rows into [q heads | k heads | v heads]
    (None: already in that order). Our row r takes the checkpoint's row rows[r].

    per_head      [H, 3, D]           GPT-NeoX, Falcon without multi-query
    per_kv_group  [Hkv, group + 2, D] Falcon's new decoder architecture: a KV group's query
                                      heads, then its key head, then its value head
    """
    if layout in ("separate", "q_k_v"):
        return None
    d = torch.arange(head_dim)
    if layout == "per_head":
        h = torch.arange(num_heads)
        heads = [(h * 3 + i)[:, None] * head_dim + d for i in range(3)]  # [H, D] each
        return torch.cat([x.flatten() for x in heads])
    if layout == "per_kv_group":
        group = num_heads // num_kv_heads
        h = torch.arange(num_heads)
        q = ((h // group) * (group + 2) + h % group)[:, None] * head_dim + d
        g = torch.arange(num_kv_heads) * (group + 2)
        k = (g + group)[:, None] * head_dim + d
        v = (g + group + 1)[:, None] * head_dim + d
        return torch.cat([q.flatten(), k.flatten(), v.flatten()])
    raise ValueError(f"unknown qkv layout {layout!r}")


def weight_and_bias(src: str, dst: str, bias: bool, rows: torch.Tensor | None = None) -> dict:
    """{src.weight: dst.weight, src.bias: dst.bias (if bias)} with an optional row order."""
    out = {f"{src}.weight": Target(f"{dst}.weight", rows=rows)}
    if bias:
        out[f"{src}.bias"] = Target(f"{dst}.bias", rows=rows)
    return out
