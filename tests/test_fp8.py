"""FP8 weights and the FP8 KV cache on CPU: loaders for both checkpoint formats, on-load
quantization, the reference math, KV sizing and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fp8_checkpoints import model_logits, random_llama, write_fp8
from worker.quant.config import QuantConfigError, resolve_fp8_scheme
from worker.quant.fp8 import (
    FP8,
    Fp8Linear,
    dequantize_weight,
    fp8_linear_ref,
    quantize_weight_per_channel,
    quantize_weight_per_tensor,
)

TOKENS = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, stories_path: Path) -> Path:
    return random_llama(tmp_path_factory.mktemp("fp8") / "base", stories_path)


@pytest.fixture(scope="module")
def stories_path() -> Path:  # module scope for `base`
    from tests.conftest import STORIES

    return STORIES


def test_weight_quantization_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g)
    w[3] *= 50  # an outlier row: per-channel scales keep the other rows precise
    wq, s = quantize_weight_per_channel(w)
    assert wq.dtype == FP8 and s.shape == (48,)
    err = (dequantize_weight(wq, s) - w).abs() / w.abs().amax(dim=1, keepdim=True)
    assert float(err.max()) <= 2**-4  # e4m3: 3 mantissa bits, half-ulp relative to the row max
    wq_t, s_t = quantize_weight_per_tensor(w)
    assert s_t.numel() == 1
    assert float(dequantize_weight(wq_t, s_t).sub(w).abs().max()) <= float(w.abs().max()) / 16


def test_fp8_linear_ref_matches_dequantized_matmul() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 32, generator=g), torch.randn(24, 32, generator=g)
    wq, s = quantize_weight_per_channel(w)
    y = fp8_linear_ref(x, wq, s, None, None)
    exact = x @ dequantize_weight(wq, s).t()
    # Only the per-token activation rounding separates them: a few percent of the scale.
    assert rel_rms(y, exact) < 0.05
    static = fp8_linear_ref(x, wq, s, torch.tensor([x.abs().max() / 448]), None)
    assert rel_rms(static, exact) < 0.05
    zero = fp8_linear_ref(torch.zeros(2, 32), wq, s, None, None)
    assert bool(torch.isfinite(zero).all()) and float(zero.abs().max()) == 0


@pytest.mark.parametrize(
    "fmt,strategy,activation",
    [
        ("compressed-tensors", "channel", "dynamic"),
        ("compressed-tensors", "tensor", "static"),
        ("fp8", "tensor", "dynamic"),
        ("fp8", "tensor", "static"),
    ],
)
def test_fp8_checkpoint_matches_dequantized_model(tmp_path, base, fmt, strategy, activation):
    fp8_dir, deq_dir = write_fp8(base, tmp_path, fmt, strategy, activation)
    got = model_logits(fp8_dir, TOKENS)
    want = model_logits(deq_dir, TOKENS)
    # Same weights; the FP8 model also rounds activations to e4m3 (per token, or with the
    # calibrated static scale). Stated tolerance: 10% relative RMS on the logits, and the
    # same top token at >= 90% of positions. A wrong scale or shard is off by far more.
    assert rel_rms(got, want) < 0.10, rel_rms(got, want)
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert agree >= 0.9, agree
    # Without the scales applied, outputs would be wrong by orders of magnitude.
    assert rel_rms(model_logits(base, TOKENS), want) < 0.2


def test_fp8_checkpoint_runs_as_fp8_layers(tmp_path, base):
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    fp8_dir, _ = write_fp8(base, tmp_path, "compressed-tensors", "channel", "dynamic")
    eng = EngineCore(EngineConfig(model=str(fp8_dir), num_gpu_blocks=8, device="cpu"))
    layer = eng.runner.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Fp8Linear)
    assert layer.self_attn.qkv_proj.weight.dtype == FP8
    assert layer.mlp.down_proj.weight_scale.dtype == torch.float32
    assert not isinstance(eng.runner.model.lm_head, Fp8Linear)  # ignored: stays 16/32-bit


def test_kv_scales_from_checkpoint(tmp_path, base):
    fp8_dir, deq_dir = write_fp8(base, tmp_path, "fp8", activation="dynamic", kv_scale=0.05)
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    eng = EngineCore(
        EngineConfig(model=str(fp8_dir), num_gpu_blocks=8, device="cpu", kv_cache_dtype="fp8")
    )
    attn = eng.runner.model.layers[1].self_attn
    assert (attn.k_scale, attn.v_scale) == (pytest.approx(0.05), pytest.approx(0.05))
    assert eng.runner.kv_caches[0].dtype == FP8
    got = model_logits(fp8_dir, TOKENS, kv_cache_dtype="fp8")
    want = model_logits(deq_dir, TOKENS)
    assert rel_rms(got, want) < 0.12


def test_quantize_on_load_matches_dequantized(tmp_path, base):
    got = model_logits(base, TOKENS, quantization="fp8")
    want = model_logits(base, TOKENS)
    assert rel_rms(got, want) < 0.10
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9


def _greedy(path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    from headrace.llm import LLM
    from ipc.messages import SamplingParams

    llm = LLM(str(path), num_gpu_blocks=256, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [r.outputs[0].token_ids for r in llm.generate(prompts, params)]


@pytest.mark.slow
def test_stories260k_fp8_on_load_agrees_with_unquantized(stories_path):
    """Teacher-forced on the unquantized model's greedy continuations, the FP8 model picks
    the same next token at >= 93% of positions."""
    from gateway.tokenizer import load_tokenizer

    tok = load_tokenizer(str(stories_path))
    texts = ["Once upon a time", "Lily went to the park", "The cat", "Tom had a big red ball"]
    texts += ["One day, a little girl", "Sam and his dog"]
    prompts = [tok.encode(t) for t in texts]
    conts = _greedy(stories_path, prompts, 32)
    same = total = 0
    for prompt, cont in zip(prompts, conts, strict=True):
        seq = prompt + cont
        want = model_logits(stories_path, seq, True, num_gpu_blocks=16).argmax(-1)
        got = model_logits(stories_path, seq, True, quantization="fp8", num_gpu_blocks=16)
        got = got.argmax(-1)
        positions = range(len(prompt) - 1, len(seq) - 1)  # predictions of the continuation
        assert [int(want[p]) for p in positions] == cont  # teacher forcing reproduces greedy
        same += sum(int(got[p]) == int(want[p]) for p in positions)
        total += len(positions)
    print(f"stories260K fp8 on load: same next token at {same}/{total} positions")
    assert same / total >= 0.93, f"{same}/{total}"


def test_fp8_kv_cache_matches_16bit_kv(base):
    # bf16 model: FP8 KV (scale 1.0) against bf16 KV. Stated tolerance: 10% relative RMS.
    want = model_logits(base, TOKENS, dtype="bfloat16")
    got = model_logits(base, TOKENS, dtype="bfloat16", kv_cache_dtype="fp8")
    assert rel_rms(got.float(), want.float()) < 0.10
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9


def test_fp8_kv_cache_doubles_blocks(base):
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    args = dict(model=str(base), device="cpu", dtype="bfloat16", kv_cache_memory_gb=0.01)
    bf16 = EngineCore(EngineConfig(**args)).kv.num_blocks
    fp8 = EngineCore(EngineConfig(**args, kv_cache_dtype="fp8_e4m3")).kv.num_blocks
    assert fp8 == 2 * bf16


def test_fp8_kv_with_prefix_caching_and_speculation(base):
    from headrace.llm import LLM
    from ipc.messages import SamplingParams

    prompts = [TOKENS[:30], TOKENS[:30] + [7, 8, 9], TOKENS[5:25] * 2]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    common = dict(device="cpu", num_gpu_blocks=64, kv_cache_dtype="fp8", block_size=4)
    plain = LLM(str(base), enable_prefix_caching=False, **common).generate(prompts, params)
    cached = LLM(str(base), max_num_batched_tokens=8, **common).generate(prompts, params)
    spec = LLM(str(base), speculative_method="ngram", num_speculative_tokens=3, **common).generate(
        prompts, params
    )
    ids = [[r.outputs[0].token_ids for r in rs] for rs in (plain, cached, spec)]
    # Prefix hits, chunked prefill and verification read the same FP8 cache bytes.
    assert ids[0] == ids[1] == ids[2]


# ---- config errors ---------------------------------------------------------------------------
def _ct(**weights: object) -> dict:
    w = {"num_bits": 8, "type": "float", "strategy": "channel"} | weights
    return {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}},
        }
    }


@pytest.mark.parametrize(
    "cfg,field",
    [
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
        (_ct(num_bits=4), "config_groups.group_0.weights.num_bits"),
        (_ct(type="int"), "config_groups.group_0.weights.type"),
        (_ct(strategy="group"), "config_groups.group_0.weights.strategy"),
        (
            {"quantization_config": {"quant_method": "fp8", "activation_scheme": "sometimes"}},
            "quantization_config.activation_scheme",
        ),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
            "quantization_config.weight_block_size",
        ),
        ({"quantization_config": {"quant_method": "compressed-tensors"}}, "config_groups"),
    ],
)
def test_unsupported_quantization_config_names_the_field(cfg, field):
    with pytest.raises(QuantConfigError, match=field.replace(".", r"\.")):
        resolve_fp8_scheme(cfg, None, "m/config.json")


def test_scheme_resolution() -> None:
    assert resolve_fp8_scheme({}, None, "x") is None
    on_load = resolve_fp8_scheme({}, "fp8", "x")
    assert on_load is not None and on_load.source == "on-load" and not on_load.checkpoint_fp8
    ct = resolve_fp8_scheme(_ct(strategy="tensor"), None, "x")
    assert ct is not None and ct.weight_strategy == "tensor" and ct.activation == "dynamic"
    assert ct.is_ignored("lm_head") and not ct.is_ignored("model.layers.0.mlp.down_proj")


def test_bad_flags_and_checkpoints_give_clear_errors(tmp_path, base):
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(model="x", kv_cache_dtype="int8").validate()
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(model="x", quantization="int3").validate()
    fp8_dir, _ = write_fp8(base, tmp_path, "compressed-tensors")
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["model.layers.0.self_attn.q_proj"]
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fused into one layer"):
        EngineCore(EngineConfig(model=str(fp8_dir), num_gpu_blocks=8, device="cpu"))
    cfg["quantization_config"]["ignore"] = ["lm_head"]
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    t = load_file(str(fp8_dir / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(t, str(fp8_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj"):
        EngineCore(EngineConfig(model=str(fp8_dir), num_gpu_blocks=8, device="cpu"))


@pytest.mark.slow
def test_gguf_quantized_on_load(smollm2_path):
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    eng = EngineCore(
        EngineConfig(model=str(smollm2_path), quantization="fp8", device="cpu", num_gpu_blocks=4)
    )
    assert isinstance(eng.runner.model.layers[0].mlp.gate_up_proj, Fp8Linear)


def test_gemv_reference_is_weight_only_math() -> None:
    from cuda.fp8_gemv import fp8_gemv, fp8_gemv_ref
    from worker.quant.fp8 import uses_gemv

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 32, generator=g), torch.randn(24, 32, generator=g)
    wq, s = quantize_weight_per_channel(w)
    bias = torch.randn(24, generator=g)
    want = x @ dequantize_weight(wq, s).t() + bias
    torch.testing.assert_close(fp8_gemv_ref(x, wq, s, bias), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fp8_gemv(x, wq, s, bias), want, rtol=1e-5, atol=1e-5)  # CPU: ref
    assert not uses_gemv(x, wq)  # the kernel is GPU-only; CPU runs fp8_linear_ref


def test_gpu_without_fp8_names_the_card(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.quant import fp8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(fp8.Fp8UnsupportedError, match=r"A100-SXM4-80GB.*capability 8\.0"):
        fp8.check_fp8_gpu(0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    fp8.check_fp8_gpu(0)  # Hopper passes


def test_dummy_fp8_weights_are_fp8_and_finite(base):
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    eng = EngineCore(
        EngineConfig(
            model=str(base), load_format="dummy", quantization="fp8", device="cpu", num_gpu_blocks=8
        )
    )
    layer = eng.runner.model.layers[0].mlp.gate_up_proj
    assert layer.weight.dtype == FP8 and float(layer.weight_scale.min()) > 0
    w = dequantize_weight(layer.weight, layer.weight_scale)
    assert 0.015 < float(w.abs().max()) <= 0.02  # uniform(-0.02, 0.02), as 16-bit dummies
    from tests.fp8_checkpoints import model_logits_of

    assert bool(torch.isfinite(model_logits_of(eng, TOKENS[:8], True)).all())
