"""Which FP8 scheme a model runs: read from its quantization_config, or chosen on load.

Pure Python (no torch). Two published checkpoint formats are understood:

- compressed-tensors (e.g. the FP8 Llama 3.1 checkpoints)::

    "quantization_config": {"quant_method": "compressed-tensors",
      "format": "float-quantized" | "naive-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"|"tensor"},
        "input_activations": {"num_bits": 8, "type": "float",
                              "strategy": "token", "dynamic": true} | ... "tensor", false}},
      "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": {...} | null}

  ("re:" entries match from the start of a module name, as re.match; others whole names.)

- vLLM's "fp8"::

    "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"|"static",
                            "ignored_layers": [...]}

Weights are float8_e4m3fn with `weight_scale` (per tensor [] / [1], or per output channel
[N] / [N, 1]); static activations carry `input_scale`. Block-wise scales
(weight_block_size, strategy "block"), group scales, int8 and packed 4-bit
compressed-tensors formats and sparse ones are refused by field. An unquantized checkpoint with `--quantization
fp8` is quantized on load: per-channel weight scales, dynamic per-token activations.
Anything else raises QuantConfigError naming the config field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

QUANTIZATION_METHODS = ("fp8",)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


class QuantConfigError(ValueError):
    """An unsupported or malformed quantization config; the message names the field."""


@dataclass(frozen=True)
class Fp8Scheme:
    """How one model's linear layers run in FP8."""

    source: str  # "compressed-tensors", "fp8" (vLLM) or "on-load" (quantized while loading)
    weight_strategy: str  # "tensor" or "channel": the checkpoint's weight_scale granularity
    activation: str  # "dynamic" (per-token scales at run time) or "static" (input_scale)
    ignore: tuple[str, ...] = ("lm_head",)  # modules left unquantized: names or "re:" patterns

    @property
    def checkpoint_fp8(self) -> bool:
        """The checkpoint already holds float8 weights (else they are quantized on load)."""
        return self.source != "on-load"

    def is_ignored(self, module: str) -> bool:
        """module: a Hugging Face module name such as 'model.layers.0.self_attn.q_proj'.
        A "re:" pattern matches from the start of the name (re.match, as compressed-tensors
        and vLLM match them: "re:.*mlp.gate$" needs its own "$" to stop at the end)."""
        short = module.removeprefix("model.")
        for pat in self.ignore:
            if pat.startswith("re:"):
                if re.match(pat[3:], module) or re.match(pat[3:], short):
                    return True
            elif pat in (module, short) or module.endswith("." + pat):
                return True
        return False


ON_LOAD = Fp8Scheme("on-load", "channel", "dynamic")


def resolve_fp8_scheme(
    hf_config: dict[str, Any], quantization: str | None, source: str
) -> Fp8Scheme | None:
    """The scheme for this model, or None for plain 16/32-bit weights.

    quantization: the --quantization flag (None or "fp8"). A checkpoint that is already
    FP8 runs as such with or without the flag.
    """
    if quantization not in (None, *QUANTIZATION_METHODS):
        raise QuantConfigError(
            f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {quantization!r}"
        )
    qc = hf_config.get("quantization_config")
    if qc is None:
        return ON_LOAD if quantization == "fp8" else None
    where = f"{source}: quantization_config"
    if not isinstance(qc, dict):
        raise QuantConfigError(f"{where} must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    if method == "fp8":
        return _vllm_fp8(qc, where)
    raise QuantConfigError(
        f"{where}.quant_method {method!r} is not supported (headrace loads FP8 checkpoints: "
        "'compressed-tensors' or 'fp8', and 4-bit ones: 'awq' or 'gptq'; or pass an "
        "unquantized model with --quantization fp8)"
    )


def _vllm_fp8(qc: dict[str, Any], where: str) -> Fp8Scheme:
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise QuantConfigError(
            f"{where}.activation_scheme must be 'dynamic' or 'static', got {scheme!r}"
        )
    if qc.get("weight_block_size") is not None:
        raise QuantConfigError(
            f"{where}.weight_block_size {qc['weight_block_size']!r}: block-wise FP8 scales "
            "are not supported (per-tensor and per-channel are)"
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise QuantConfigError(f"{where}.fmt {fmt!r} is not supported (only 'e4m3')")
    ignore = _names(qc.get("ignored_layers") or [], f"{where}.ignored_layers")
    return Fp8Scheme("fp8", "tensor", scheme, tuple(ignore) + ("lm_head",))


# compressed-tensors' formats that store FP8 weights as float8 tensors beside their scales.
CT_FP8_FORMATS = ("float-quantized", "naive-quantized")


def _ct_format(fmt: Any, where: str) -> None:
    if fmt is not None and fmt not in CT_FP8_FORMATS:
        raise QuantConfigError(
            f"{where}.format {fmt!r} is not supported (FP8 checkpoints are "
            f"{' or '.join(map(repr, CT_FP8_FORMATS))}; int8, packed 4-bit and sparse "
            "compressed-tensors formats are not)"
        )


def _compressed_tensors(qc: dict[str, Any], where: str) -> Fp8Scheme:
    if qc.get("format") != "mixed-precision":  # else each group names its own format
        _ct_format(qc.get("format"), where)
    sparsity = qc.get("sparsity_config")
    if isinstance(sparsity, dict) and sparsity.get("format", "dense") != "dense":
        raise QuantConfigError(
            f"{where}.sparsity_config.format {sparsity['format']!r}: sparse weights are not "
            "supported"
        )
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantConfigError(f"{where}.config_groups must be a non-empty object")
    schemes = {_ct_group(g, f"{where}.config_groups.{name}") for name, g in groups.items()}
    if len(schemes) > 1:
        raise QuantConfigError(
            f"{where}.config_groups: groups with different schemes {sorted(schemes)} are not "
            "supported (one FP8 scheme for every Linear)"
        )
    strategy, activation = schemes.pop()
    kv = qc.get("kv_cache_scheme")
    if kv is not None:
        _check_float8(kv, f"{where}.kv_cache_scheme")
    ignore = _names(qc.get("ignore") or [], f"{where}.ignore")
    return Fp8Scheme("compressed-tensors", strategy, activation, tuple(ignore) + ("lm_head",))


def _ct_group(g: Any, where: str) -> tuple[str, str]:
    if not isinstance(g, dict):
        raise QuantConfigError(f"{where} must be an object")
    _ct_format(g.get("format"), where)
    targets = g.get("targets", ["Linear"])
    if not isinstance(targets, list) or "Linear" not in targets:
        raise QuantConfigError(f"{where}.targets {targets!r} must include 'Linear'")
    w = g.get("weights")
    if not isinstance(w, dict):
        raise QuantConfigError(f"{where}.weights must be an object")
    _check_float8(w, f"{where}.weights")
    strategy = w.get("strategy", "tensor")
    if strategy not in ("tensor", "channel"):
        raise QuantConfigError(
            f"{where}.weights.strategy {strategy!r} is not supported ('tensor' or 'channel')"
        )
    if w.get("dynamic", False):
        raise QuantConfigError(f"{where}.weights.dynamic must be false (weights carry scales)")
    a = g.get("input_activations")
    if a is None:  # weight-only FP8: activations are quantized per token at run time
        return strategy, "dynamic"
    if not isinstance(a, dict):
        raise QuantConfigError(f"{where}.input_activations must be an object or null")
    _check_float8(a, f"{where}.input_activations")
    a_strategy = a.get("strategy", "tensor")
    if a_strategy not in ("tensor", "token"):
        raise QuantConfigError(
            f"{where}.input_activations.strategy {a_strategy!r} is not supported "
            "('token' or 'tensor')"
        )
    dynamic = a.get("dynamic", False)
    if dynamic not in (True, False):
        raise QuantConfigError(f"{where}.input_activations.dynamic must be true or false")
    if not dynamic and a_strategy == "token":
        raise QuantConfigError(
            f"{where}.input_activations: static per-token scales are not possible "
            "(static needs strategy 'tensor')"
        )
    # dynamic per-tensor runs as dynamic per-token: finer scales, never less accurate.
    return strategy, "dynamic" if dynamic else "static"


def _check_float8(d: Any, where: str) -> None:
    if not isinstance(d, dict):
        raise QuantConfigError(f"{where} must be an object")
    if d.get("num_bits") != 8:
        raise QuantConfigError(
            f"{where}.num_bits {d.get('num_bits')!r} is not supported (FP8 needs 8)"
        )
    if d.get("type", "float") != "float":
        raise QuantConfigError(
            f"{where}.type {d.get('type')!r} is not supported (only 'float': FP8 e4m3)"
        )
    if d.get("symmetric", True) is not True:
        raise QuantConfigError(f"{where}.symmetric must be true (FP8 scales have no zero point)")
    if d.get("group_size") not in (None, 0):
        raise QuantConfigError(f"{where}.group_size {d['group_size']!r}: group scales unsupported")


def _names(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QuantConfigError(f"{where} must be a list of module names")
    return list(value)


def check_kv_cache_dtype(name: str) -> None:
    if name not in KV_CACHE_DTYPES:
        raise QuantConfigError(
            f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}"
        )
