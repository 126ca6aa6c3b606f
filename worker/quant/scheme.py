"""Which weight quantization a model runs: FP8 (worker/quant/config.py), 4-bit AWQ / GPTQ
(worker/quant/int4.py), or none; from the --quantization flag and the checkpoint's
quantization_config together.

    flag        quantization_config     result
    none        none                    16-bit weights
    awq | gptq  none                    dummy weights: random 4-bit ones (Int4Config.for_dummy);
                                        a real checkpoint: error (no 4-bit quantizing on load)
    none | same awq / gptq              that format, as the config says
    other       awq / gptq              error naming both
    awq | gptq  anything else           error naming both
    otherwise                           the FP8 rules (resolve_fp8_scheme)

A folder whose config.json has no quantization_config may carry it in AutoGPTQ's
quantize_config.json or AutoAWQ's quant_config.json (older checkpoints): read as if it
were config.json's.
"""

from __future__ import annotations

import json
import os
from typing import Any

from worker.quant.config import Fp8Scheme, QuantConfigError, resolve_fp8_scheme
from worker.quant.int4 import Int4Config

INT4_METHODS = ("awq", "gptq")
QuantScheme = Fp8Scheme | Int4Config


def resolve_quant_scheme(
    hf_config: dict[str, Any], quantization: str | None, source: str, dummy: bool
) -> QuantScheme | None:
    if "quantization_config" not in hf_config and not dummy:
        side = side_quant_config(source, quantization)
        if side is not None:
            name, side_qc = side
            hf_config = hf_config | {"quantization_config": side_qc}
            source = f"{source} ({name}, as quantization_config)"
    qc = hf_config.get("quantization_config")
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else None
    if quantization not in INT4_METHODS and method not in INT4_METHODS:
        return resolve_fp8_scheme(hf_config, quantization, source)
    if qc is None:
        assert quantization is not None
        if dummy:
            return Int4Config.for_dummy(quantization, _in_features(hf_config))
        raise QuantConfigError(
            f"--quantization {quantization} needs a {quantization.upper()} checkpoint: "
            f"{source}/config.json has no quantization_config (headrace does not quantize "
            "to 4 bits on load; --quantization fp8 does quantize on load)"
        )
    if quantization is not None and quantization != method:
        raise QuantConfigError(
            f"--quantization {quantization} does not match {source}: quantization_config."
            f"quant_method is {qc.get('quant_method')!r} (leave the flag out to use the "
            "checkpoint's)"
        )
    assert isinstance(qc, dict)
    try:
        return Int4Config.from_hf(qc)
    except ValueError as e:
        raise QuantConfigError(f"{source}: {e}") from None


# Written beside config.json by AutoGPTQ (quantize_config.json) and AutoAWQ
# (quant_config.json) before their settings moved into config.json's quantization_config.
SIDE_FILES = ("quantize_config.json", "quant_config.json")
_AWQ_KEYS = ("w_bit", "q_group_size", "zero_point", "version")


def side_quant_config(folder: str, quantization: str | None) -> tuple[str, dict] | None:
    """(file name, its settings with quant_method filled in) from the first side file in
    `folder`, or None. Without a quant_method in the file it is the --quantization flag's
    4-bit method, else AWQ for AutoAWQ's key names, else GPTQ."""
    for name in SIDE_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                qc = json.load(f)
        except (OSError, ValueError) as e:
            raise QuantConfigError(f"{path}: cannot read it as JSON: {e}") from None
        if not isinstance(qc, dict):
            raise QuantConfigError(f"{path} must hold a JSON object")
        if "quant_method" not in qc:
            if quantization in INT4_METHODS:
                method = quantization
            else:
                method = "awq" if any(k in qc for k in _AWQ_KEYS) else "gptq"
            qc = qc | {"quant_method": method}
        return name, qc
    return None


def _in_features(hf_config: dict[str, Any]) -> tuple[int, ...]:
    """The linear layers' input sizes, as far as config.json names them."""
    keys = ("hidden_size", "intermediate_size", "ffn_hidden_size", "n_embd")
    sizes = [hf_config[k] for k in keys if isinstance(hf_config.get(k), int)]
    heads, head_dim = hf_config.get("num_attention_heads"), hf_config.get("head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        sizes.append(heads * head_dim)  # o_proj's input when head_dim is set apart
    return tuple(sizes)


def describe(quant: QuantScheme | None, dtype: str) -> str:
    """For the load log line: what the linear layers hold."""
    if quant is None:
        return dtype
    if isinstance(quant, Fp8Scheme):
        return f"fp8, {quant.source}"
    return quant.describe()
