"""Per-layer attention types from config.json (sliding vs full), as transformers reads them."""

from __future__ import annotations

import pytest

from worker.model_config import ModelConfig, UnsupportedModelError

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    vocab_size=512,
)


def windows(arch: str, **cfg: object) -> list[int | None]:
    mc = ModelConfig.from_hf({"architectures": [arch], **BASE, **cfg})
    return [mc.layer_sliding_window(i) for i in range(mc.num_layers)]


def test_qwen2_windows_layers_from_max_window_layers_on():
    q = "Qwen2ForCausalLM"
    assert windows(q, use_sliding_window=True, sliding_window=8, max_window_layers=3) == [
        None, None, None, 8,
    ]  # fmt: skip
    assert windows(q, use_sliding_window=False, sliding_window=8) == [None] * 4
    # Without max_window_layers, transformers' default (28) leaves these 4 layers full.
    mc = ModelConfig.from_hf(
        {"architectures": [q], **BASE, "use_sliding_window": True, "sliding_window": 8}
    )
    assert (
        mc.sliding_window is None
        and windows(q, use_sliding_window=True, sliding_window=8) == [None] * 4
    )


def test_layer_types_are_followed_and_checked():
    types = ["full_attention", "sliding_attention"] * 2
    assert windows(
        "Qwen2ForCausalLM", use_sliding_window=True, sliding_window=8, layer_types=types
    ) == [None, 8, None, 8]
    assert windows("MistralForCausalLM", sliding_window=8) == [8] * 4
    assert windows("LlamaForCausalLM") == [None] * 4
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        windows("MistralForCausalLM", sliding_window=8, layer_types=["full_attention"])
