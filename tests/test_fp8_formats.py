"""FP8 checkpoints as their formats define them, beyond what our own writer makes: every
weight_scale shape (per tensor [] / [1], per channel [N, 1] / [N]), compressed-tensors'
"naive-quantized" format, "re:" ignore patterns matched from the start of the name,
layers the ignore list keeps 16-bit, saved all-zero zero points, KV cache scales, vLLM
"fp8" with fused q/k/v and gate/up shards of very different per-tensor scales, sharded
safetensors, tied embeddings; and the configs and tensors we refuse, by field or name.

Each checkpoint is written here (tests/quant_checkpoints.py quantizes with the FP8
definition, not with our loader's code) from a tiny random model, beside a twin holding
the dequantized weights in fp32. With the activation rounding taken out (the FP8 layers'
per-token quantization replaced by the identity), what is left is weight math: the two
must give the same logits to fp32 rounding, so a wrong scale, row or shard is far off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.quant_checkpoints import engine, fp8_dequantize, fp8_quantize, model_logits, save_folder
from tests.tiny_models import make_tiny_model
from worker.quant.fp8 import Fp8Linear

TOKENS = torch.randint(3, 512, (24,), generator=torch.Generator().manual_seed(5)).tolist()
FP8 = torch.float8_e4m3fn


@pytest.fixture
def exact_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.quant import fp8

    monkeypatch.setattr(
        fp8, "quantize_per_token_ref", lambda x, s=None: (x.float(), torch.ones(x.shape[0], 1))
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import STORIES

    return make_tiny_model("llama", tmp_path_factory.mktemp("fp8fmt") / "llama", STORIES)


def is_linear(name: str) -> bool:
    return name.endswith("_proj.weight")


def ct_config(
    strategy: str = "channel",
    activation: str = "dynamic",
    fmt: str = "float-quantized",
    ignore: list[str] | None = None,
    kv: bool = False,
) -> dict[str, Any]:
    """compressed-tensors' quantization_config for FP8 W8A8 (llm-compressor's FP8 and
    FP8_DYNAMIC presets)."""
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "observer": "minmax"}
    if activation == "dynamic":
        acts |= {"strategy": "token", "dynamic": True}
    else:
        acts |= {"strategy": "tensor", "dynamic": False}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    weights |= {"strategy": strategy, "group_size": None, "block_structure": None}
    kv_scheme = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
    kv_scheme |= {"symmetric": True}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": acts,
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"] if ignore is None else ignore,
        "kv_cache_scheme": kv_scheme if kv else None,
        "sparsity_config": {},
    }


def write_fp8_pair(
    src: Path,
    dest: Path,
    qc: dict[str, Any],
    scale_shape: str = "col",  # "scalar" [], "one" [1], "col" [N, 1], "row" [N]
    keep_16bit: Any = lambda name: False,  # modules the ignore list names
    static: bool = False,
    extra: Any = None,  # extra(tensors): add or change tensors of the FP8 folder
    shards: int = 1,
    linear: Any = is_linear,  # linear(name): the tensor is a weight the file quantizes
) -> tuple[Path, Path]:
    """(FP8 folder, dequantized fp32 twin) of the model folder src."""
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    fp8: dict[str, torch.Tensor] = {}
    deq: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        module = name.removesuffix(".weight")
        if not linear(name) or keep_16bit(module):
            fp8[name] = deq[name] = w
            continue
        q, scale = fp8_quantize(w, per_row=scale_shape in ("col", "row"))
        fp8[name] = q
        shapes = {"scalar": (), "one": (1,), "col": (-1, 1), "row": (-1,)}
        fp8[f"{module}.weight_scale"] = scale.reshape(shapes[scale_shape])
        if static:  # a distinct value per module, so the fused max is checkable
            fp8[f"{module}.input_scale"] = torch.tensor([0.01 + 0.001 * len(module)])
        deq[name] = fp8_dequantize(q, scale)
    if extra is not None:
        extra(fp8)
    fp8_dir = save_folder(src, dest / "fp8", fp8, config | {"quantization_config": qc}, shards)
    return fp8_dir, save_folder(src, dest / "deq", deq, config)


def check_same(fp8_dir: Path, deq_dir: Path, **engine_args: Any) -> None:
    got, want = model_logits(fp8_dir, TOKENS, **engine_args), model_logits(deq_dir, TOKENS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))  # greedy tokens


@pytest.mark.parametrize(
    ("strategy", "scale_shape", "fmt", "activation"),
    [
        ("tensor", "scalar", "float-quantized", "dynamic"),
        ("tensor", "one", "naive-quantized", "static"),
        ("channel", "col", "float-quantized", "static"),
        ("channel", "row", "naive-quantized", "dynamic"),
    ],
)
def test_compressed_tensors_scale_shapes(
    llama, tmp_path, exact_activations, strategy, scale_shape, fmt, activation
):
    qc = ct_config(strategy, activation, fmt)
    static = activation == "static"
    fp8_dir, deq_dir = write_fp8_pair(llama, tmp_path, qc, scale_shape, static=static)
    check_same(fp8_dir, deq_dir)
    qkv = engine(fp8_dir).runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == FP8
    assert (qkv.input_scale is not None) == static
    if static:  # fused q/k/v keep the largest of their shards' input_scale
        names = ("q_proj", "k_proj", "v_proj")
        want = max(0.01 + 0.001 * len(f"model.layers.0.self_attn.{n}") for n in names)
        assert float(qkv.input_scale) == pytest.approx(want)


def test_ignore_patterns_match_from_the_start(llama, tmp_path, exact_activations):
    """compressed-tensors matches "re:" entries with re.match: "re:model.layers.1.mlp"
    covers layer 1's gate_proj, up_proj and down_proj; plain names match whole names."""
    ignore = ["lm_head", r"re:model\.layers\.1\.mlp", "model.layers.2.self_attn.o_proj"]
    kept = ("model.layers.1.mlp.", "model.layers.2.self_attn.o_proj")
    fp8_dir, deq_dir = write_fp8_pair(
        llama, tmp_path, ct_config(ignore=ignore), keep_16bit=lambda m: m.startswith(kept)
    )
    check_same(fp8_dir, deq_dir)
    layers = engine(fp8_dir).runner.model.layers
    assert not isinstance(layers[1].mlp.gate_up_proj, Fp8Linear)
    assert not isinstance(layers[1].mlp.down_proj, Fp8Linear)
    assert not isinstance(layers[2].self_attn.o_proj, Fp8Linear)
    assert isinstance(layers[2].self_attn.qkv_proj, Fp8Linear)
    assert isinstance(layers[0].mlp.down_proj, Fp8Linear)


def test_mixed_precision_format_with_float_groups(llama, tmp_path, exact_activations):
    """Top-level format "mixed-precision": each group names its own (here FP8 ones)."""
    qc = ct_config()
    qc["format"] = "mixed-precision"
    qc["config_groups"]["group_0"]["format"] = "float-quantized"
    fp8_dir, deq_dir = write_fp8_pair(llama, tmp_path, qc)
    check_same(fp8_dir, deq_dir)
    qc["config_groups"]["group_0"]["format"] = "pack-quantized"
    (fp8_dir / "config.json").write_text(
        json.dumps(json.loads((fp8_dir / "config.json").read_text()) | {"quantization_config": qc})
    )
    with pytest.raises(ValueError, match=r"config_groups\.group_0\.format 'pack-quantized'"):
        engine(fp8_dir)


def test_zero_points_kv_scales_and_shards(llama, tmp_path, exact_activations):
    """All-zero weight_zero_point tensors (some writers save them), k_scale / v_scale of
    shape [] and [1], and four shards with a module's weight and scale apart."""

    def extra(t: dict) -> None:
        for name in [n for n in t if n.endswith(".weight_scale")]:
            t[name.replace("weight_scale", "weight_zero_point")] = torch.zeros(
                t[name].shape, dtype=torch.int8
            )
        for layer in range(3):
            t[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.02 * (layer + 1))
            t[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor([0.03])

    qc = ct_config(kv=True)
    fp8_dir, deq_dir = write_fp8_pair(llama, tmp_path, qc, extra=extra, shards=4)
    assert len(list(fp8_dir.glob("*.safetensors"))) == 4
    check_same(fp8_dir, deq_dir)
    attn = engine(fp8_dir, kv_cache_dtype="fp8").runner.model.layers[2].self_attn
    assert (attn.k_scale, attn.v_scale) == (pytest.approx(0.06), pytest.approx(0.03))


def test_single_kv_scale(llama, tmp_path):
    """The older single self_attn.kv_scale sets both the K and the V scale."""

    def extra(t: dict) -> None:
        for layer in range(3):
            t[f"model.layers.{layer}.self_attn.kv_scale"] = torch.tensor([0.04])

    fp8_dir, _ = write_fp8_pair(llama, tmp_path, {"quant_method": "fp8"}, "scalar", extra=extra)
    attn = engine(fp8_dir, kv_cache_dtype="fp8").runner.model.layers[0].self_attn
    assert (attn.k_scale, attn.v_scale) == (pytest.approx(0.04), pytest.approx(0.04))


def test_tied_embeddings(tmp_path, stories_path, exact_activations):
    """Qwen2 ties the LM head to the embedding: the head stays 16-bit, shared."""
    src = make_tiny_model("qwen2", tmp_path / "qwen2", stories_path)
    assert "lm_head.weight" not in load_file(str(src / "model.safetensors"))
    fp8_dir, deq_dir = write_fp8_pair(src, tmp_path, ct_config())
    check_same(fp8_dir, deq_dir)
    model = engine(fp8_dir).runner.model
    assert model.lm_head.weight is model.embed_tokens.weight
    assert isinstance(model.layers[0].self_attn.qkv_proj, Fp8Linear)


def test_vllm_fp8_fused_shards_with_different_scales(llama, tmp_path, exact_activations):
    """vLLM's "fp8": one scale per checkpoint tensor; q/k/v and gate/up are fused into
    one layer here, each shard keeping its own scale (k_proj and up_proj scaled up 20x,
    so a shared scale would be far off). ignored_layers keeps a layer 16-bit."""
    tensors = load_file(str(llama / "model.safetensors"))
    for name in tensors:
        if name.endswith(("k_proj.weight", "up_proj.weight")):
            tensors[name] = tensors[name] * 20
    src = save_folder(
        llama, tmp_path / "scaled", tensors, json.loads((llama / "config.json").read_text())
    )
    qc = {
        "quant_method": "fp8",
        "activation_scheme": "static",
        "ignored_layers": ["model.layers.0.mlp.down_proj"],
    }
    fp8_dir, deq_dir = write_fp8_pair(
        src,
        tmp_path,
        qc,
        "scalar",
        keep_16bit=lambda m: m == "model.layers.0.mlp.down_proj",
        static=True,
    )
    check_same(fp8_dir, deq_dir)
    layers = engine(fp8_dir).runner.model.layers
    scales = layers[1].self_attn.qkv_proj.weight_scale
    q_rows = layers[1].self_attn.qkv_proj.out_features - 2 * 2 * 8  # 2 KV heads of 8
    assert float(scales[q_rows : q_rows + 16].min()) > 10 * float(scales[:q_rows].max())
    assert not isinstance(layers[0].mlp.down_proj, Fp8Linear)
    assert isinstance(layers[1].mlp.down_proj, Fp8Linear)


def test_layers_we_keep_16bit_are_dequantized(tmp_path, stories_path, exact_activations):
    """An FP8 Mixtral quantizes its experts and (not ignored) router, which run 16-bit
    here: their float8 weights are dequantized on load with their scales, in any order."""
    src = make_tiny_model("mixtral", tmp_path / "mixtral", stories_path)

    def linear(name: str) -> bool:
        return name.endswith(("_proj.weight", "block_sparse_moe.gate.weight")) or (
            ".experts." in name and name.endswith(".weight")
        )

    fp8_dir, deq_dir = write_fp8_pair(src, tmp_path, ct_config(), linear=linear, shards=3)
    check_same(fp8_dir, deq_dir)
    layer = engine(fp8_dir).runner.model.layers[1]
    assert isinstance(layer.self_attn.qkv_proj, Fp8Linear)
    assert layer.mlp.w_gate_up.dtype == torch.float32
    assert not isinstance(layer.mlp.gate, Fp8Linear)


def test_quantized_lm_head_is_dequantized(llama, tmp_path, exact_activations):
    """ignore: [] quantizes the LM head too; ours stays 16-bit, from the float8 head."""
    fp8_dir, deq_dir = write_fp8_pair(
        llama,
        tmp_path,
        ct_config(ignore=[]),
        "scalar",
        linear=lambda n: is_linear(n) or n == "lm_head.weight",
    )
    assert load_file(str(fp8_dir / "model.safetensors"))["lm_head.weight"].dtype == FP8
    check_same(fp8_dir, deq_dir)


def _group(**weights: Any) -> dict[str, Any]:
    w = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True} | weights
    return {"targets": ["Linear"], "weights": w}


def _with(qc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return qc | changes


CT = ct_config()
BAD_CONFIGS = [
    # int8 W8A8 (SmoothQuant / llm-compressor W8A8)
    (
        _with(CT, format="int-quantized", config_groups={"g": _group(type="int")}),
        r"quantization_config\.format 'int-quantized'",
    ),
    (
        _with(CT, format=None, config_groups={"g": _group(type="int")}),
        r"config_groups\.g\.weights\.type 'int'",
    ),
    # 4-bit weights packed into int32 (W4A16)
    (
        _with(CT, format="pack-quantized", config_groups={"g": _group(num_bits=4, type="int")}),
        r"quantization_config\.format 'pack-quantized'",
    ),
    (
        _with(CT, config_groups={"g": _group(strategy="block", block_structure=[128, 128])}),
        r"config_groups\.g\.weights\.strategy 'block'",
    ),
    (
        _with(CT, config_groups={"g": _group(strategy="group", group_size=128)}),
        r"config_groups\.g\.weights\.group_size 128: group scales unsupported",
    ),
    (
        _with(
            CT,
            config_groups={
                "g": _group()
                | {
                    "input_activations": {
                        "num_bits": 8,
                        "type": "float",
                        "strategy": "tensor_group",
                        "dynamic": "local",
                    }
                }
            },
        ),
        r"config_groups\.g\.input_activations\.strategy 'tensor_group'",
    ),
    (
        _with(CT, sparsity_config={"format": "sparse-24-bitmask"}),
        r"sparsity_config\.format 'sparse-24-bitmask'",
    ),
    (
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
        r"quantization_config\.weight_block_size \[128, 128\]",
    ),
    ({"quant_method": "modelopt", "quant_algo": "FP8"}, r"quant_method 'modelopt'"),
]


@pytest.mark.parametrize(("qc", "match"), BAD_CONFIGS)
def test_unsupported_configs_name_the_field(llama, tmp_path, qc, match):
    config = json.loads((llama / "config.json").read_text()) | {"quantization_config": qc}
    path = save_folder(llama, tmp_path / "bad", load_file(str(llama / "model.safetensors")), config)
    with pytest.raises(ValueError, match=match):
        engine(path)


Q = "model.layers.1.self_attn.q_proj"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.pop(f"{Q}.weight_scale"), rf"missing tensors: {Q}\.weight_scale"),
        (lambda t: t.pop(f"{Q}.input_scale"), rf"missing tensors: {Q}\.input_scale"),
        (
            lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].float()}),
            rf"'{Q}\.weight' is torch\.float32, but quantization_config says",
        ),
        (
            lambda t: t.update({f"{Q}.weight_zero_point": torch.ones(1, dtype=torch.int8)}),
            rf"'{Q}\.weight_zero_point' holds nonzero zero points",
        ),
        (
            lambda t: t.update({"lm_head.weight": t["lm_head.weight"].to(FP8)}),
            r"missing tensors: lm_head\.weight_scale \(the scale of float8 lm_head\.weight\)",
        ),
        (
            lambda t: t.update({f"{Q}.weight_scale": torch.ones(5)}),
            rf"'{Q}\.weight_scale' has 5 scales; expected 1 \(per tensor\) or 64",
        ),
    ],
)
def test_bad_tensors_are_named(llama, tmp_path, edit, match):
    fp8_dir, _ = write_fp8_pair(
        llama, tmp_path, ct_config(activation="static"), static=True, extra=edit
    )
    with pytest.raises(ValueError, match=match):
        engine(fp8_dir)
