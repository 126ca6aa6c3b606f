"""The model's architecture, parsed from a Hugging Face config.json dict.

Accepts both transformers-4 style (`rope_theta`, `rope_scaling`) and transformers-5 style
(`rope_parameters`) configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # e.g. LlamaForCausalLM
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # {"rope_type": "llama3" | "linear" | ..., ...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    mlp_bias: bool
    sliding_window: int | None  # the window of the sliding layers; None when none slides
    torch_dtype: str | None  # the checkpoint's dtype name, e.g. "bfloat16"
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Per layer: "sliding_attention" or "full_attention" (config `layer_types`); empty means
    # every layer slides when sliding_window is set.
    layer_types: tuple[str, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"{source}: architecture {archs or cfg.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        kind = SUPPORTED_ARCHITECTURES[arch]

        def need(key: str) -> Any:
            if key not in cfg:
                raise UnsupportedModelError(f"{source}: missing required field {key!r}")
            return cfg[key]

        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        rope = cfg.get("rope_parameters") or {}
        rope_theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = dict(rope)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        sliding = (
            cfg.get("sliding_window")
            if kind == "mistral" or cfg.get("use_sliding_window")
            else None
        )
        num_layers = int(need("num_hidden_layers"))
        layer_types = _layer_types(cfg, kind, num_layers, source) if sliding else ()
        if layer_types and "sliding_attention" not in layer_types:
            sliding = None
        dtype = cfg.get("torch_dtype", cfg.get("dtype"))
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            vocab_size=int(need("vocab_size")),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", kind == "qwen2")),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=str(dtype) if dtype else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            layer_types=layer_types,
        )

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of one layer (None: it attends to the whole context)."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def max_context(self) -> int:
        """The longest context the model supports (rope scaling may extend training length)."""
        return self.max_position_embeddings


def _layer_types(cfg: dict[str, Any], kind: str, num_layers: int, source: str) -> tuple[str, ...]:
    """Which layers slide, as transformers decides: the config's `layer_types` when given;
    for Qwen2 the layers from `max_window_layers` on (transformers' default 28)."""
    types = cfg.get("layer_types")
    if types is None and kind == "qwen2":
        first = int(cfg.get("max_window_layers", 28))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if types is None:
        return ()
    types = tuple(str(t) for t in types)
    if len(types) != num_layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise UnsupportedModelError(
            f"{source}: layer_types must list 'sliding_attention' or 'full_attention' for "
            f"each of the {num_layers} layers, got {list(types)!r}"
        )
    return types
