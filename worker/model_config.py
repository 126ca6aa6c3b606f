"""The model's architecture, parsed from a Hugging Face config.json dict.

Accepts both transformers-4 style (`rope_theta`, `rope_scaling`) and transformers-5 style
(`rope_parameters`) configs. One dataclass covers every family: the fields past
`eos_token_ids` say where a family departs from Llama (norm kind, fused q/k/v layout,
partial rotary, parallel attention and MLP, mixture of experts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.models.rope import ROPE_TYPES

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "FalconForCausalLM": "falcon",
    "GPTNeoXForCausalLM": "gpt_neox",
}

# How a checkpoint's fused query_key_value rows are laid out (we reorder them to q | k | v).
QKV_LAYOUTS = (
    "separate",  # q_proj, k_proj, v_proj tensors (Llama family)
    "q_k_v",  # one tensor, rows [Hq*D | Hkv*D | Hkv*D] (Falcon-7B multi-query)
    "per_head",  # one tensor, rows [H, 3, D]: each head's q, k, v (GPT-NeoX, Falcon MHA)
    "per_kv_group",  # rows [Hkv, group + 2, D]: a group's q heads, its k, its v (Falcon-40B)
)
FALCON_ALIASES = {
    "n_embed": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_head_kv": "num_kv_heads",
}
# The activation each MLP kind computes: the Llama family's gated MLP is SiLU only; the
# two-layer MLP (Falcon, GPT-NeoX) runs exact GELU or its tanh form (gelu_new,
# gelu_pytorch_tanh and GPT-NeoX-20B's gelu_fast are all that formula).
GATED_ACTIVATIONS = ("silu",)
GELU_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")
ACTIVATIONS = GATED_ACTIVATIONS + GELU_ACTIVATIONS
# transformers' defaults for the fields a config.json may leave out, where a family's
# differ from the rest (configuration_*.py): what the checkpoint was trained with. Not
# num_key_value_heads (Mistral's / Mixtral's 8, Qwen2's 32): an absent one means as many
# as the query heads here, as hand-written configs (and our tests) expect.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048),
    "mistral": dict(max_position_embeddings=4096 * 32, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, sliding_window=4096),
    "mixtral": dict(
        max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
    ),
    "falcon": dict(max_position_embeddings=2048),
    "gpt_neox": dict(max_position_embeddings=2048),
}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # e.g. LlamaForCausalLM
    hidden_size: int
    intermediate_size: int  # per expert for mixtures of experts
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float  # also the LayerNorm epsilon where norm == "layer"
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
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with bias)
    hidden_act: str = "silu"  # silu: gated MLP (gate, up, down); gelu*: two-layer MLP
    o_proj_bias: bool = False  # the attention output projection carries a bias
    qkv_layout: str = "separate"  # see QKV_LAYOUTS
    rotary_dim: int = 0  # dims of each head that rotate (the first ones); 0 = head_dim
    parallel_attn: bool = False  # x + attn(norm(x)) + mlp(norm'(x)) instead of sequential
    shared_norm: bool = False  # parallel_attn with one norm feeding both branches
    num_experts: int = 0  # mixture of experts: experts per layer (0 = dense MLP)
    num_experts_per_tok: int = 0  # experts each token is routed to
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
        if kind == "falcon":  # the original Falcon configs' names
            cfg = {FALCON_ALIASES.get(k, k): v for k, v in cfg.items()}

        def need(key: str) -> Any:
            if key not in cfg:
                raise UnsupportedModelError(f"{source}: missing required field {key!r}")
            return cfg[key]

        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_layers = int(need("num_hidden_layers"))
        defaults = FAMILY_DEFAULTS[kind]

        def get(key: str, fallback: Any = None) -> Any:
            """The config's value; transformers' default for this family where it has none."""
            value = cfg.get(key)
            return defaults.get(key, fallback) if value is None else value

        max_pos = int(get("max_position_embeddings", 2048))
        rope_theta, scaling = _rope(cfg, source, max_pos, float(get("rope_theta", 10000.0)))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        sliding = _sliding_window(cfg, kind, defaults)
        layer_types = _layer_types(cfg, kind, num_layers, source) if sliding else ()
        if layer_types and "sliding_attention" not in layer_types:
            sliding = None
        dtype = cfg.get("torch_dtype", cfg.get("dtype"))
        base: dict[str, Any] = dict(
            architecture=arch,
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(get("num_key_value_heads", num_heads)),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            vocab_size=int(need("vocab_size")),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=False,
            mlp_bias=False,
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=str(dtype) if dtype else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            layer_types=layer_types,
        )
        if kind == "falcon":
            base.update(_falcon_fields(cfg, source, hidden))
        elif kind == "gpt_neox":
            base.update(_gpt_neox_fields(cfg, source, base))
        else:
            base.update(_llama_fields(cfg, kind, need))
        config = cls(**base)
        config.validate(source)
        return config

    def validate(self, source: str) -> None:
        """ValueErrors (UnsupportedModelError) naming the config.json field at fault."""
        gated = self.norm == "rms"  # the Llama family's gated MLP (and Mixtral's experts)
        supported = GATED_ACTIVATIONS if gated else GELU_ACTIVATIONS
        if self.hidden_act not in supported:
            field_name = "hidden_act" if gated or "NeoX" in self.architecture else "activation"
            raise UnsupportedModelError(
                f"{source}: {field_name} {self.hidden_act!r} is not supported for "
                f"{self.architecture} (supported: {', '.join(supported)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"{source}: num_attention_heads ({self.num_heads}) is not a multiple of the "
                f"key/value heads ({self.num_kv_heads})"
            )
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise UnsupportedModelError(
                f"{source}: rotary dims {self.rotary_dim} (rotary_pct / partial_rotary_factor "
                f"x head_dim {self.head_dim}) must be even and in (0, head_dim]"
            )
        if (
            self.rope_scaling
            and self.rope_scaling["rope_type"] == "dynamic"
            and self.rotary_dim < 4
        ):
            raise UnsupportedModelError(
                f"{source}: dynamic rope scaling needs at least 4 rotary dims, got {self.rotary_dim}"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UnsupportedModelError(
                f"{source}: num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"[1, num_local_experts = {self.num_experts}]"
            )

    def __post_init__(self) -> None:
        if self.rotary_dim == 0:
            object.__setattr__(self, "rotary_dim", self.head_dim)

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of one layer (None: it attends to the whole context)."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def max_context(self) -> int:
        """The longest context the model supports, as vLLM derives it: rope scaling that
        stretches positions (linear, dynamic, yarn) extends the trained length by its
        factor (yarn's trained length is original_max_position_embeddings); llama3 configs
        state the extended length in max_position_embeddings already."""
        s = self.rope_scaling
        if s is None or s["rope_type"] == "llama3":
            return self.max_position_embeddings
        trained = self.max_position_embeddings
        if s["rope_type"] == "yarn":
            trained = int(s["original_max_position_embeddings"])
        return max(self.max_position_embeddings, int(trained * float(s["factor"])))

    def max_context_origin(self) -> str:
        """Where max_context comes from, in config.json's terms (for error messages)."""
        s = self.rope_scaling
        if s is None or self.max_context == self.max_position_embeddings:
            return "max_position_embeddings"
        trained = "original_max_position_embeddings" if s["rope_type"] == "yarn" else ""
        return f"{trained or 'max_position_embeddings'} x rope scaling factor {s['factor']}"


def _rope(
    cfg: dict[str, Any], source: str, max_pos: int, default_theta: float
) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, rope scaling or None) from either config style, the scaling checked
    and completed as transformers completes it (standardize_rope_params): llama3 and yarn
    take original_max_position_embeddings from the top level, else max_position_embeddings;
    yarn without a factor takes max_position_embeddings / original."""
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta") or default_theta)
    field_name = "rope_scaling"
    scaling = cfg.get("rope_scaling")
    if scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
        scaling, field_name = rope, "rope_parameters"
    if scaling is None:
        return theta, None
    # theta and the rotary fraction are read on their own (transformers 5 keeps them here)
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor")}
    kind = scaling.setdefault("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: {field_name} rope_type {kind!r} is not supported "
            f"(supported: default, {', '.join(ROPE_TYPES)})"
        )
    omp = "original_max_position_embeddings"
    if kind in ("llama3", "yarn"):
        scaling[omp] = int(cfg.get(omp) or scaling.get(omp) or max_pos)
    if kind == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = max_pos / scaling[omp]
    needed = ["factor"] + (["low_freq_factor", "high_freq_factor"] if kind == "llama3" else [])
    for key in needed:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise UnsupportedModelError(
                f"{source}: {field_name} of rope_type {kind!r} needs a number > 0 in "
                f"{key!r}, got {value!r}"
            )
    return theta, scaling


def _sliding_window(cfg: dict[str, Any], kind: str, defaults: dict[str, Any]) -> int | None:
    """The window as transformers reads it: Mistral and Mixtral slide when sliding_window
    is set (null: no window; absent: the family's default), Qwen2 only with
    use_sliding_window; Llama, Falcon and GPT-NeoX never (their models have no window)."""
    if kind in ("mistral", "mixtral") or (kind == "qwen2" and cfg.get("use_sliding_window")):
        return cfg["sliding_window"] if "sliding_window" in cfg else defaults.get("sliding_window")
    return None


def _llama_fields(cfg: dict[str, Any], kind: str, need: Callable[[str], Any]) -> dict[str, Any]:
    """Llama, Mistral, Qwen2 and Mixtral: the MLP, and which projections carry biases as
    each family's transformers model builds them. Llama reads attention_bias (q, k, v and
    o) and mlp_bias; Qwen2 always has q/k/v biases and no others; Mistral and Mixtral none
    (transformers ignores those keys in their configs, so do we)."""
    out: dict[str, Any] = dict(
        intermediate_size=int(need("intermediate_size")),
        hidden_act=str(cfg.get("hidden_act") or "silu"),
    )
    if kind == "llama":
        bias = bool(cfg.get("attention_bias", False))
        out.update(attention_bias=bias, o_proj_bias=bias, mlp_bias=bool(cfg.get("mlp_bias")))
    elif kind == "qwen2":
        out["attention_bias"] = True
    if kind == "mixtral":
        out["num_experts"] = int(need("num_local_experts"))
        out["num_experts_per_tok"] = int(need("num_experts_per_tok"))
    return out


def _falcon_fields(cfg: dict[str, Any], source: str, hidden: int) -> dict[str, Any]:
    """Falcon: 7B (multi-query, one shared LayerNorm, parallel attention + MLP) and the
    new decoder architecture of 40B/180B (grouped KV heads, ln_attn and ln_mlp)."""
    if cfg.get("alibi"):
        raise UnsupportedModelError(
            f"{source}: Falcon with alibi: true is not supported (only rotary Falcon models)"
        )
    heads = int(cfg["num_attention_heads"])
    new_arch = bool(cfg.get("new_decoder_architecture", False))
    multi_query = bool(cfg.get("multi_query", True))
    parallel = bool(cfg.get("parallel_attn", True))
    kv = cfg.get("num_kv_heads")
    if new_arch:
        kv_heads, layout = int(kv or heads), "per_kv_group"
        num_ln = cfg.get("num_ln_in_parallel_attn") or 2
        if not parallel:  # transformers' FalconDecoderLayer has no such layer either
            raise UnsupportedModelError(
                f"{source}: new_decoder_architecture needs parallel_attn: true"
            )
        shared = num_ln == 1
    elif multi_query:
        kv_heads, layout, shared = 1, "q_k_v", parallel
    else:
        kv_heads, layout, shared = heads, "per_head", parallel
    bias = bool(cfg.get("bias", False))
    ffn = cfg.get("ffn_hidden_size") or 4 * hidden
    return dict(
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate_size=int(ffn),
        rms_norm_eps=float(cfg.get("layer_norm_epsilon") or 1e-5),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attention_bias=bias,
        o_proj_bias=bias,
        mlp_bias=bias,
        norm="layer",
        hidden_act=str(cfg.get("activation") or "gelu"),
        qkv_layout=layout,
        parallel_attn=parallel,
        shared_norm=shared,
    )


def _gpt_neox_fields(cfg: dict[str, Any], source: str, base: dict[str, Any]) -> dict[str, Any]:
    """GPT-NeoX / Pythia: per-head fused q/k/v, partial rotary, optional parallel residual."""
    rope = cfg.get("rope_parameters") or {}
    pct = float(cfg.get("rotary_pct", rope.get("partial_rotary_factor", 0.25)))
    theta = float(cfg.get("rotary_emb_base", rope.get("rope_theta", 10000.0)))
    head_dim = base["hidden_size"] // base["num_heads"]
    bias = bool(cfg.get("attention_bias", True))
    if int(head_dim * pct) < 2:  # 0 would read as "all of head_dim" below
        raise UnsupportedModelError(
            f"{source}: rotary_pct / partial_rotary_factor {pct} rotates no dims of head_dim "
            f"{head_dim}"
        )
    if "intermediate_size" not in cfg:
        raise UnsupportedModelError(f"{source}: missing required field 'intermediate_size'")
    return dict(
        num_kv_heads=base["num_heads"],
        head_dim=head_dim,
        intermediate_size=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        rope_theta=theta,
        attention_bias=bias,
        o_proj_bias=bias,
        mlp_bias=True,
        norm="layer",
        hidden_act=str(cfg.get("hidden_act", "gelu")),
        qkv_layout="per_head",
        rotary_dim=int(head_dim * pct),
        parallel_attn=bool(cfg.get("use_parallel_residual", True)),
    )


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
