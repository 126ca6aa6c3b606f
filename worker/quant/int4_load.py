"""Loading AWQ / GPTQ tensors: each checkpoint module's parts (qweight, qzeros, scales,
g_idx) arrive one at a time and in any order; once a module's are all there, they are
checked against the layer (errors name the tensor), converted to the kernels' layout
(worker/quant/int4_repack.py) and written into the layer's rows.

Targets (worker/models/int4_weights.py makes them) of kind
- "int4": an Int4Linear's rows (`index`: a fused layer's row slice; `rows`: a reorder
  of the checkpoint's rows, Falcon / GPT-NeoX q/k/v); the part "bias" of a layer without
  a bias is a stray zero bias some GPTQ writers save, accepted only if it is zero;
- "int4_dequant": a 16-bit parameter (Mixtral's stacked experts) that takes the module's
  dequantized weight.

Fused shards of a desc_act GPTQ layer must share one input order (g_idx): q/k/v (and gate
/ up) see the same inputs, so GPTQ's act order, taken from those inputs, is the same for
them; vLLM relies on this too. A checkpoint where they differ is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from worker.quant.int4 import Int4Config, dequantize_awq, dequantize_gptq
from worker.quant.int4_linear import Int4Linear
from worker.quant.int4_repack import PARTS, check_parts, to_rows

if TYPE_CHECKING:
    from worker.models.weights import Target

REQUIRED = ("qweight", "qzeros", "scales")


@dataclass
class _Shard:
    target: Target
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class Int4Assembler:
    def __init__(self, model: nn.Module, source: str, params: dict[str, nn.Parameter]) -> None:
        cfg = getattr(model, "quant_scheme", None)
        if not isinstance(cfg, Int4Config):
            raise ValueError(f"{source}: 4-bit tensors, but the model is not built for int4")
        self.cfg = cfg
        self.model = model
        self.source = source
        self.params = params
        self.pending: dict[str, _Shard] = {}
        self.orders: dict[str, tuple[str, torch.Tensor | None]] = {}  # layer -> first g_idx

    def add(self, name: str, target: Target, tensor: torch.Tensor) -> None:
        prefix, _, part = name.rpartition(".")
        if part == "bias":
            self._stray_bias(name, target, tensor)
            return
        shard = self.pending.setdefault(prefix, _Shard(target))
        shard.parts[part] = tensor.to(self._device(target))
        if set(shard.parts) >= set(PARTS[self.cfg.method]):
            self._write(prefix, self.pending.pop(prefix))

    def finish(self) -> None:
        """Write the modules that came without a g_idx (GPTQ without act order)."""
        for prefix, shard in list(self.pending.items()):
            missing = [p for p in REQUIRED if p not in shard.parts]
            if missing:
                raise ValueError(
                    f"{self.source}: checkpoint is missing tensors {prefix}.{missing[0]}"
                )
            self._write(prefix, shard)
        self.pending.clear()

    def _device(self, target: Target) -> torch.device:
        if target.kind == "int4":
            layer = self.model.get_submodule(target.param)
            assert isinstance(layer, Int4Linear)
            return layer.qweight.device
        return self.params[target.param].device

    def _write(self, prefix: str, shard: _Shard) -> None:
        where = f"{self.source}: {prefix}"
        t = shard.target
        if t.kind == "int4_dequant":
            self._dequantize_into(where, t, shard.parts)
            return
        layer = self.model.get_submodule(t.param)
        assert isinstance(layer, Int4Linear)
        out_f = layer.qweight.data[t.index].shape[0] if t.index else layer.out_features
        check_parts(shard.parts, self.cfg, layer.in_features, out_f, where)
        w = to_rows(shard.parts, self.cfg, where)
        qw, scales, zeros = w.qw, w.scales, w.zeros
        if self.cfg.method == "gptq" and not self.cfg.zeros_minus_one:
            zeros = zeros - 1  # gptq_v2: to_rows added GPTQ v1's + 1 to zeros stored as is
        if t.rows is not None:
            rows = t.rows.to(qw.device)
            qw, scales, zeros = qw[rows], scales[rows], zeros[rows]
        for dst, src in ((layer.qweight, qw), (layer.scales, scales), (layer.zeros, zeros)):
            (dst.data[t.index] if t.index else dst.data).copy_(src)
        if layer.perm is not None:
            self._input_order(prefix, t.param, layer, w.perm)
        layer.weights_changed()

    def _input_order(
        self, prefix: str, key: str, layer: Int4Linear, perm: torch.Tensor | None
    ) -> None:
        first = self.orders.get(key)
        if first is None:
            self.orders[key] = (prefix, perm)
            if perm is not None:
                assert layer.perm is not None
                layer.perm.data.copy_(perm)
                layer.reorders = True
            return
        first_prefix, first_perm = first
        same = (perm is None and first_perm is None) or (
            perm is not None and first_perm is not None and torch.equal(perm, first_perm)
        )
        if not same:
            raise ValueError(
                f"{self.source}: {prefix}.g_idx differs from {first_prefix}.g_idx; the two are "
                "fused into one layer, which runs with one input order (desc_act)"
            )

    def _dequantize_into(self, where: str, t: Target, parts: dict[str, torch.Tensor]) -> None:
        p = self.params[t.param]
        dst = p.data[t.index] if t.index else p.data  # [out, in]
        out_f, in_f = dst.shape
        check_parts(parts, self.cfg, in_f, out_f, where)
        if self.cfg.method == "awq":
            w = dequantize_awq(
                parts["qweight"], parts["qzeros"], parts["scales"], self.cfg, dst.dtype
            )
        else:
            qw, qz, s = parts["qweight"], parts["qzeros"], parts["scales"]
            w = dequantize_gptq(qw, qz, s, parts.get("g_idx"), self.cfg, dst.dtype)
        dst.copy_(w if t.rows is None else w[t.rows.to(w.device)])

    def _stray_bias(self, name: str, target: Target, tensor: torch.Tensor) -> None:
        if bool((tensor != 0).any()):
            raise ValueError(
                f"{self.source}: tensor {name!r} is a nonzero bias, but the model's layer "
                f"{target.param} has none (config.json says the layer has no bias)"
            )
