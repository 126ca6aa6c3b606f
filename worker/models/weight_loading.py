"""Copying a checkpoint's tensors into a LlamaForCausalLM, FP8 layers included.

Hugging Face names map onto our fused layers (q/k/v -> qkv_proj rows, gate/up ->
gate_up_proj rows; see `LlamaForCausalLM.param_slices`). For an Fp8Linear:

- `X.weight` float8: copied as is; 16/32-bit: quantized per output channel on the way
  (on the parameter's device), which also fills its rows of `weight_scale`;
- `X.weight_scale`: one value (per-tensor, broadcast to the shard's rows) or one per row;
- `X.input_scale` (static activations): fused shards keep the largest, as vLLM does.

KV cache scales (`self_attn.k_scale` / `v_scale`, or the older `k_proj.output_scale`)
set the attention layer's k_scale / v_scale. Every expected tensor must arrive, else the
error lists the missing ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from worker.quant.fp8 import FP8, Fp8Linear, quantize_weight_per_channel

if TYPE_CHECKING:
    from worker.models.llama import LlamaForCausalLM

_KV_SCALE = re.compile(
    r"(?:model\.)?layers\.(\d+)\.self_attn\.(?:attn\.)?(?:(k|v)_scale|(k|v)_proj\.output_scale)$"
)


def load_weights(
    model: LlamaForCausalLM, weights: Iterable[tuple[str, torch.Tensor]], source: str
) -> None:
    loader = _Loader(model, source)
    for name, tensor in weights:
        loader.add(name, tensor)
    loader.check_complete()


class _Loader:
    def __init__(self, model: LlamaForCausalLM, source: str) -> None:
        self.model = model
        self.source = source
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.modules = dict(model.named_modules())
        self.slices = model.param_slices()
        self.loaded: set[str] = set()
        self.started: set[str] = set()  # input_scale parameters given a first value

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if "rotary_emb.inv_freq" in name:
            return
        if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
            return
        if self._kv_scale(name, tensor):
            return
        target, rows = _map_name(name, self.slices)
        param = self.params.get(target)
        if param is None:
            raise ValueError(f"{self.source}: unexpected tensor {name!r} in checkpoint")
        module_name, _, leaf = target.rpartition(".")
        module = self.modules.get(module_name)
        if isinstance(module, Fp8Linear) and leaf != "bias":
            self._add_fp8(module, target, leaf, rows, name, tensor)
            return
        if tensor.dtype == FP8:
            raise ValueError(
                f"{self.source}: tensor {name!r} is float8 but its layer is not quantized "
                "(it is the lm_head or in quantization_config's ignore list)"
            )
        self._copy(param.data, rows, name, tensor)
        self._mark(target, rows)

    def _add_fp8(
        self,
        module: Fp8Linear,
        target: str,
        leaf: str,
        rows: tuple[int, int] | None,
        name: str,
        tensor: torch.Tensor,
    ) -> None:
        a, b = rows if rows is not None else (0, module.out_features)
        if leaf == "weight":
            if tensor.dtype == FP8:
                self._copy(module.weight.data, rows, name, tensor)
            else:  # quantize on load: per output channel, so each shard's rows stand alone
                self._check_shape(module.weight.data[a:b], name, tensor)
                wq, scales = quantize_weight_per_channel(tensor.to(module.weight.device))
                module.weight.data[a:b].copy_(wq)
                module.weight_scale.data[a:b].copy_(scales)
                self._mark(target.removesuffix("weight") + "weight_scale", rows)
        elif leaf == "weight_scale":
            dst = module.weight_scale.data[a:b]
            s = tensor.float().reshape(-1).to(dst.device)
            if s.numel() not in (1, dst.numel()):
                raise ValueError(
                    f"{self.source}: tensor {name!r} has {s.numel()} scales; expected 1 "
                    f"(per tensor) or {dst.numel()} (per channel)"
                )
            dst.copy_(s.expand(dst.numel()))
        elif leaf == "input_scale":
            if tensor.numel() != 1:
                raise ValueError(f"{self.source}: tensor {name!r} must hold one scale")
            if module.input_scale is not None:
                cur = module.input_scale.data  # uninitialized (to_empty) until the first shard
                new = tensor.float().reshape(1).to(cur.device)
                first = target not in self.started
                self.started.add(target)
                cur.copy_(new if first else torch.maximum(cur, new))
        self._mark(target, rows)

    def _kv_scale(self, name: str, tensor: torch.Tensor) -> bool:
        m = _KV_SCALE.search(name)
        if m is None:
            return False
        layer = int(m.group(1))
        if layer >= len(self.model.layers):
            raise ValueError(f"{self.source}: tensor {name!r}: no layer {layer} in the model")
        attn = self.model.layers[layer].self_attn
        value = float(tensor.float().max())
        if not value > 0:
            raise ValueError(f"{self.source}: tensor {name!r} must be > 0, got {value}")
        setattr(attn, "k_scale" if (m.group(2) or m.group(3)) == "k" else "v_scale", value)
        return True

    def _check_shape(self, dst: torch.Tensor, name: str, tensor: torch.Tensor) -> None:
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{self.source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(dst.shape)}"
            )

    def _copy(
        self, data: torch.Tensor, rows: tuple[int, int] | None, name: str, tensor: torch.Tensor
    ) -> None:
        dst = data if rows is None else data[rows[0] : rows[1]]
        self._check_shape(dst, name, tensor)
        dst.copy_(tensor)

    def _mark(self, target: str, rows: tuple[int, int] | None) -> None:
        self.loaded.add(target if rows is None else f"{target}[{rows[0]}:{rows[1]}]")

    def check_complete(self) -> None:
        expected: dict[str, str] = {}  # our key -> checkpoint name, for the message
        for pname, _ in self.model.named_parameters():  # a tied lm_head appears once
            fused = [(src, d, a, b) for src, (d, a, b) in self.slices.items() if f".{d}." in pname]
            for src, fused_name, a, b in fused:
                expected[f"{pname}[{a}:{b}]"] = "model." + pname.replace(fused_name, src)
            if not fused:
                expected[pname] = pname if pname.startswith("lm_head") else "model." + pname
        missing = [hf for key, hf in expected.items() if key not in self.loaded]
        if missing:
            shown = ", ".join(missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"{self.source}: checkpoint is missing tensors: {shown}{more}")


def _map_name(
    name: str, slices: dict[str, tuple[str, int, int]]
) -> tuple[str, tuple[int, int] | None]:
    # HF: model.layers.N.self_attn.q_proj.weight -> layers.N.self_attn.qkv_proj.weight rows[a:b]
    if name.startswith("model."):
        name = name[len("model.") :]
    for src, (dst, a, b) in slices.items():
        if f".{src}." in name:
            return name.replace(f".{src}.", f".{dst}."), (a, b)
    return name, None
