"""config.json as each family's transformers config reads it, and the errors for what we
do not run: each names the field at fault. Hub checkpoints carry transformers-4 configs
(rope_theta, rope_scaling, torch_dtype, rotary_pct); transformers 5 saves rope_parameters
and dtype: both parse to the same ModelConfig."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import transformers

from tests.tiny_models import make_tiny_model
from worker.model_config import ModelConfig, UnsupportedModelError

LLAMA = dict(
    architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=512,
)  # fmt: skip
MIXTRAL = LLAMA | dict(
    architectures=["MixtralForCausalLM"], num_local_experts=4, num_experts_per_tok=2
)
NEOX = dict(
    architectures=["GPTNeoXForCausalLM"], hidden_size=64, num_attention_heads=4,
    num_hidden_layers=2, intermediate_size=128, vocab_size=512,
)  # fmt: skip
FALCON = dict(
    architectures=["FalconForCausalLM"], hidden_size=64, num_attention_heads=8,
    num_hidden_layers=2, vocab_size=512,
)  # fmt: skip
REQUIRED = {
    "LlamaForCausalLM": (LLAMA, ["hidden_size", "num_attention_heads", "num_hidden_layers",
                                 "vocab_size", "intermediate_size"]),
    "MixtralForCausalLM": (MIXTRAL, ["intermediate_size", "num_local_experts",
                                     "num_experts_per_tok"]),
    "GPTNeoXForCausalLM": (NEOX, ["hidden_size", "intermediate_size", "vocab_size"]),
    "FalconForCausalLM": (FALCON, ["hidden_size", "num_attention_heads", "num_hidden_layers"]),
}  # fmt: skip


def parse(cfg: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_hf(copy.deepcopy(cfg), source="m/config.json")


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(UnsupportedModelError, match=r"\['GemmaForCausalLM'\] is not supported"):
        parse(LLAMA | dict(architectures=["GemmaForCausalLM"]))
    with pytest.raises(UnsupportedModelError, match="'phi3' is not supported"):
        parse({k: v for k, v in LLAMA.items() if k != "architectures"} | {"model_type": "phi3"})


@pytest.mark.parametrize("arch", list(REQUIRED))
def test_missing_required_field_is_named(arch: str) -> None:
    base, fields = REQUIRED[arch]
    for key in fields:
        cfg = {k: v for k, v in base.items() if k != key}
        with pytest.raises(UnsupportedModelError, match=f"json: missing required field '{key}'"):
            parse(cfg)


@pytest.mark.parametrize(
    "scaling,match",
    [
        (dict(rope_type="longrope", short_factor=[1.0], long_factor=[2.0]), "'longrope' is not"),
        (dict(type="su", factor=2.0), "rope_scaling rope_type 'su' is not supported"),
        (dict(rope_type="linear"), "needs a number > 0 in 'factor', got None"),
        (dict(rope_type="dynamic", factor=0), "'factor', got 0"),
        (dict(rope_type="llama3", factor=8.0, high_freq_factor=4.0), "'low_freq_factor'"),
    ],
)
def test_unsupported_rope_scaling_is_refused_at_parse(scaling: dict, match: str) -> None:
    with pytest.raises(UnsupportedModelError, match=match):
        parse(LLAMA | dict(rope_scaling=scaling))
    with pytest.raises(
        UnsupportedModelError, match=match.replace("rope_scaling", "rope_parameters")
    ):
        parse(LLAMA | dict(rope_parameters=scaling | dict(rope_theta=1e4)))


def test_rope_scaling_is_completed_as_transformers_does() -> None:
    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    c = parse(LLAMA | dict(max_position_embeddings=4096, rope_scaling=llama3))
    assert c.rope_scaling is not None
    assert c.rope_scaling["original_max_position_embeddings"] == 4096
    assert c.max_context == 4096  # llama3 configs state the extended length already
    yarn = dict(type="yarn", factor=4.0, original_max_position_embeddings=32768)
    c = parse(LLAMA | dict(max_position_embeddings=32768, rope_scaling=yarn))  # Qwen2.5 style
    assert c.max_context == 131072 and "original_max_position_embeddings x" in (
        c.max_context_origin()
    )
    no_factor = dict(rope_type="yarn", original_max_position_embeddings=64)
    c = parse(LLAMA | dict(max_position_embeddings=256, rope_parameters=no_factor))
    assert c.rope_scaling is not None and c.rope_scaling["factor"] == 4.0
    c = parse(
        LLAMA | dict(max_position_embeddings=2048, rope_scaling=dict(type="linear", factor=8))
    )
    assert c.max_context == 16384 and c.max_context_origin().endswith("factor 8")
    assert parse(LLAMA | dict(rope_scaling=dict(type="default"))).rope_scaling is None


def test_family_defaults_for_absent_fields() -> None:
    m = parse(MIXTRAL)
    assert (m.rms_norm_eps, m.rope_theta, m.sliding_window, m.max_context) == (
        1e-5, 1e6, None, 131072,
    )  # fmt: skip
    mistral = LLAMA | dict(architectures=["MistralForCausalLM"])
    assert parse(mistral).sliding_window == 4096  # MistralConfig's default
    assert parse(mistral | dict(sliding_window=None)).sliding_window is None
    llama = parse(LLAMA)
    assert (llama.rms_norm_eps, llama.rope_theta, llama.max_context) == (1e-6, 1e4, 2048)
    assert parse(LLAMA | dict(use_sliding_window=True, sliding_window=8)).sliding_window is None
    no_kv = {k: v for k, v in LLAMA.items() if k != "num_key_value_heads"}
    assert parse(no_kv).num_kv_heads == 8
    falcon = parse(FALCON | dict(layer_norm_epsilon=None, activation=None))
    assert (falcon.rms_norm_eps, falcon.hidden_act) == (1e-5, "gelu")


def test_biases_follow_each_family() -> None:
    """transformers' Mistral and Mixtral have no biases whatever the config says; Qwen2
    always has q/k/v biases and no others; Llama reads attention_bias and mlp_bias."""
    for arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        c = parse(MIXTRAL | dict(architectures=[arch], attention_bias=True, mlp_bias=True))
        assert not (c.attention_bias or c.o_proj_bias or c.mlp_bias), arch
    q = parse(LLAMA | dict(architectures=["Qwen2ForCausalLM"], attention_bias=False, mlp_bias=True))
    assert (q.attention_bias, q.o_proj_bias, q.mlp_bias) == (True, False, False)
    c = parse(LLAMA | dict(attention_bias=True, mlp_bias=True))
    assert (c.attention_bias, c.o_proj_bias, c.mlp_bias) == (True, True, True)


def test_activations_are_checked_per_mlp_kind() -> None:
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu' is not supported for Llama"):
        parse(LLAMA | dict(hidden_act="gelu"))
    with pytest.raises(UnsupportedModelError, match="hidden_act 'silu' is not supported for GPT"):
        parse(NEOX | dict(hidden_act="silu"))
    with pytest.raises(UnsupportedModelError, match="activation 'relu' is not supported"):
        parse(FALCON | dict(activation="relu"))
    assert parse(NEOX | dict(hidden_act="gelu_fast")).hidden_act == "gelu_fast"


def test_falcon_alibi_and_sequential_new_architecture_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="alibi: true is not supported"):
        parse(FALCON | dict(alibi=True, multi_query=False, parallel_attn=False, bias=True))
    with pytest.raises(UnsupportedModelError, match="new_decoder_architecture needs parallel_attn"):
        parse(FALCON | dict(new_decoder_architecture=True, parallel_attn=False))


def _as_transformers4(cfg: dict[str, Any]) -> dict[str, Any]:
    """A transformers-5 config.json as transformers 4 wrote it (hub checkpoints)."""
    old = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "dtype", "layer_types")}
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None)
    pct = rope.pop("partial_rotary_factor", None)
    if cfg["model_type"] == "gpt_neox":
        old.update(rotary_emb_base=theta, rotary_pct=pct)
    else:
        old["rope_theta"] = theta
    if rope.get("rope_type", "default") != "default":
        old["rope_scaling"] = rope
    if "dtype" in cfg:
        old["torch_dtype"] = cfg["dtype"]
    return old


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (
            transformers.LlamaConfig,
            dict(
                rope_theta=5e5,
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=64,
                ),
            ),
        ),
        (
            transformers.Qwen2Config,
            dict(
                rope_theta=1e6,
                use_sliding_window=True,
                sliding_window=8,
                max_window_layers=1,
                rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64),
            ),
        ),
        (transformers.MixtralConfig, dict(num_local_experts=4, sliding_window=16)),
        (transformers.GPTNeoXConfig, dict(rotary_pct=0.5, rotary_emb_base=500)),
        (transformers.FalconConfig, dict(new_decoder_architecture=True, num_kv_heads=2)),
    ],
)
def test_transformers_4_and_5_configs_parse_alike(cls, kwargs, tmp_path: Path) -> None:
    sizes = dict(hidden_size=64, num_attention_heads=8, num_hidden_layers=3, vocab_size=512)
    if cls is not transformers.FalconConfig:
        sizes.update(intermediate_size=128, num_key_value_heads=2)
    cls(**sizes, **kwargs, dtype="bfloat16").save_pretrained(tmp_path)
    new = json.loads((tmp_path / "config.json").read_text())
    new["architectures"] = [cls.__name__.replace("Config", "ForCausalLM")]
    assert parse(new) == parse(_as_transformers4(new))
    assert parse(new).torch_dtype == "bfloat16"


def test_max_model_len_past_the_context_is_refused(tmp_path: Path, stories_path: Path) -> None:
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    path = make_tiny_model("llama", tmp_path / "m", stories_path, max_position_embeddings=32)
    too_long = r"max_model_len \(33\) is larger than the model's context length \(32, max_pos"
    with pytest.raises(ValueError, match=too_long):
        EngineCore(EngineConfig(model=str(path), device="cpu", max_model_len=33))
    linear = dict(rope_type="linear", factor=2.0)
    path = make_tiny_model(
        "llama", tmp_path / "l", stories_path, max_position_embeddings=32, rope_scaling=linear
    )
    with pytest.raises(
        ValueError, match=r"\(64, max_position_embeddings x rope scaling factor 2.0"
    ):
        EngineCore(EngineConfig(model=str(path), device="cpu", max_model_len=65))
    engine = EngineCore(EngineConfig(model=str(path), device="cpu", max_model_len=64))
    assert engine.max_model_len == 64
    engine.shutdown()
