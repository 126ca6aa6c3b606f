"""Config parsing and checkpoint layouts of Falcon, GPT-NeoX and Mixtral (no engine run)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.falcon.modeling_falcon import FalconAttention

from worker.model_config import ModelConfig, UnsupportedModelError
from worker.models.weights import qkv_rows


def _falcon_split(cfg: transformers.FalconConfig) -> torch.Tensor:
    """Which fused row feeds each of our q | k | v rows, by transformers' own split."""
    attn = FalconAttention(cfg, layer_idx=0)
    hq = cfg.num_attention_heads
    fused = torch.arange(attn.query_key_value.weight.shape[0]).float()[None, None]
    q, k, v = attn._split_heads(fused)  # [1, 1, H*, D]
    kv = cfg.num_kv_heads if cfg.new_decoder_architecture else k.shape[2]
    if cfg.new_decoder_architecture:  # k and v were broadcast to the query heads
        k, v = k[:, :, :: hq // kv], v[:, :, :: hq // kv]
    return torch.cat([q.flatten(), k.flatten(), v.flatten()]).long()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(new_decoder_architecture=True, num_kv_heads=2),
        dict(new_decoder_architecture=True, num_kv_heads=8),
        dict(multi_query=True),
        dict(multi_query=False),
    ],
)
def test_falcon_qkv_rows_follow_transformers_split(kwargs) -> None:
    cfg = transformers.FalconConfig(hidden_size=64, num_attention_heads=8, **kwargs)
    ours = ModelConfig.from_hf(
        {**cfg.to_dict(), "architectures": ["FalconForCausalLM"]}, source="falcon"
    )
    rows = qkv_rows(ours.qkv_layout, ours.num_heads, ours.num_kv_heads, ours.head_dim)
    expected = _falcon_split(cfg)
    n = expected.numel()
    assert torch.equal(torch.arange(n) if rows is None else rows, expected)


def test_gpt_neox_qkv_rows_follow_transformers_view() -> None:
    H, D = 4, 8
    fused = torch.arange(3 * H * D)
    q, k, v = fused.view(H, 3 * D).chunk(3, dim=-1)  # GPTNeoXAttention's view + chunk
    rows = qkv_rows("per_head", H, H, D)
    assert rows is not None
    assert torch.equal(fused[rows], torch.cat([q.flatten(), k.flatten(), v.flatten()]))


def _falcon(**kw) -> dict:
    base = dict(architectures=["FalconForCausalLM"], hidden_size=64, num_attention_heads=8)
    return {**base, "num_hidden_layers": 2, "vocab_size": 100, **kw}


def test_falcon_configs() -> None:
    seven_b = ModelConfig.from_hf(_falcon())  # the defaults are Falcon-7B's layout
    assert (seven_b.num_kv_heads, seven_b.qkv_layout, seven_b.shared_norm) == (1, "q_k_v", True)
    assert seven_b.tie_word_embeddings and seven_b.norm == "layer"
    assert seven_b.intermediate_size == 256 and seven_b.hidden_act == "gelu"
    new = ModelConfig.from_hf(_falcon(new_decoder_architecture=True, num_kv_heads=2, bias=True))
    assert (new.num_kv_heads, new.qkv_layout, new.shared_norm) == (2, "per_kv_group", False)
    assert new.attention_bias and new.o_proj_bias and new.mlp_bias
    old = {"architectures": ["FalconForCausalLM"], "n_embed": 64, "n_head": 8, "n_layer": 2}
    assert ModelConfig.from_hf({**old, "vocab_size": 10}).num_layers == 2
    with pytest.raises(UnsupportedModelError, match="alibi"):
        ModelConfig.from_hf(_falcon(alibi=True))
    with pytest.raises(UnsupportedModelError, match="parallel_attn"):
        ModelConfig.from_hf(_falcon(new_decoder_architecture=True, parallel_attn=False))
    with pytest.raises(UnsupportedModelError, match="activation"):
        ModelConfig.from_hf(_falcon(activation="relu"))


def test_gpt_neox_and_mixtral_configs() -> None:
    pythia = dict(
        architectures=["GPTNeoXForCausalLM"], hidden_size=512, num_attention_heads=8,
        num_hidden_layers=6, intermediate_size=2048, vocab_size=50304, rotary_pct=0.25,
        rotary_emb_base=10000, use_parallel_residual=True, layer_norm_eps=1e-5,
    )  # fmt: skip
    c = ModelConfig.from_hf(pythia)
    assert (c.head_dim, c.rotary_dim, c.parallel_attn, c.qkv_layout) == (64, 16, True, "per_head")
    assert not c.tie_word_embeddings and c.attention_bias
    v5 = {k: v for k, v in pythia.items() if not k.startswith("rotary")}
    v5["rope_parameters"] = {"rope_theta": 500.0, "partial_rotary_factor": 0.5}
    c = ModelConfig.from_hf(v5)
    assert (c.rotary_dim, c.rope_theta) == (32, 500.0)
    with pytest.raises(UnsupportedModelError, match="rotary"):
        ModelConfig.from_hf({**pythia, "rotary_pct": 0.01})
    mixtral = dict(
        architectures=["MixtralForCausalLM"], hidden_size=64, num_attention_heads=8,
        num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96, vocab_size=100,
        num_local_experts=8, num_experts_per_tok=2, sliding_window=4096,
    )  # fmt: skip
    c = ModelConfig.from_hf(mixtral)
    assert (c.num_experts, c.num_experts_per_tok, c.sliding_window) == (8, 2, 4096)
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok"):
        ModelConfig.from_hf({**mixtral, "num_experts_per_tok": 9})
