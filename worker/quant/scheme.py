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
"""

from __future__ import annotations

from typing import Any

from worker.quant.config import Fp8Scheme, QuantConfigError, resolve_fp8_scheme
from worker.quant.int4 import Int4Config

INT4_METHODS = ("awq", "gptq")
QuantScheme = Fp8Scheme | Int4Config


def resolve_quant_scheme(
    hf_config: dict[str, Any], quantization: str | None, source: str, dummy: bool
) -> QuantScheme | None:
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
