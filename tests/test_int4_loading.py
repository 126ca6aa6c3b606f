"""Loading 4-bit checkpoints: the repack to the kernels' layout, bad checkpoints and flags
(each error names the field or tensor), stray zero biases, and random (dummy) 4-bit
weights made without a 16-bit copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from cuda.int4_gemm import int4_linear_ref
from tests.int4_checkpoints import quantized_pair
from tests.test_int4_models import write_int4
from worker.quant.int4 import Int4Config
from worker.quant.int4_linear import Int4Linear
from worker.quant.int4_repack import check_parts, to_rows

QC = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": True},
}


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("awq", dict(group_size=32)),
        ("gptq", dict(group_size=64, sym=True)),
        ("gptq", dict(group_size=32, sym=False, desc_act=True)),
        ("gptq", dict(group_size=-1, sym=True)),
    ],
)
def test_repacked_weight_computes_the_encoded_matmul(method: str, kwargs: dict) -> None:
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(40, 128, generator=g), torch.randn(5, 128, generator=g)
    parts, w_deq = quantized_pair(w, method, seed=7, **kwargs)
    qc = {"quant_method": method, "bits": 4} | {
        "group_size": kwargs["group_size"],
        "sym": kwargs.get("sym", False),
        "desc_act": kwargs.get("desc_act", False),
    }
    cfg = Int4Config.from_hf(qc)
    check_parts(parts, cfg, 128, 40, "m")
    rows = to_rows(parts, cfg, "m")
    assert (rows.perm is not None) == kwargs.get("desc_act", False)
    torch.testing.assert_close(int4_linear_ref(x, rows), x @ w_deq.t(), rtol=1e-5, atol=1e-5)


def engine(path: Path, **kwargs: Any) -> Any:
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    return EngineCore(EngineConfig(model=str(path), num_gpu_blocks=8, device="cpu", **kwargs))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.conftest import STORIES
    from tests.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("int4load")
    src = make_tiny_model("llama", root / "src", STORIES)
    return {
        "src": src,
        "awq": write_int4(src, root / "awq", "awq")[0],
        "gptq": write_int4(src, root / "gptq", "gptq-desc-act")[0],
        "gptq-own-orders": write_int4(src, root / "own", "gptq-desc-act", shared_orders=False)[0],
    }


def edited(src: Path, dest: Path, config: dict | None = None, tensors: Any = None) -> Path:
    """A copy of the checkpoint folder src with config fields and tensors changed."""
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    for key, value in (config or {}).items():
        cfg["quantization_config"][key] = value
    (dest / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(str(src / "model.safetensors"))
        tensors(t)
        save_file(t, str(dest / "model.safetensors"))
    return dest


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("folder", "config", "tensors", "match"),
    [
        ("awq", {"bits": 8}, None, r"quantization_config\.bits is 8"),
        ("awq", {"quant_method": "squeezellm"}, None, r"quant_method 'squeezellm'"),
        ("awq", {"group_size": 48}, None, r"group_size 48 does not divide in_features 64 of"),
        ("gptq", {"checkpoint_format": "marlin"}, None, "checkpoint_format"),
        ("awq", None, lambda t: t.pop(f"{Q}.qzeros"), rf"missing tensors: {Q}\.qzeros"),
        ("gptq", None, lambda t: t.pop(f"{Q}.g_idx"), rf"missing tensors: {Q}\.g_idx"),
        (
            "awq",
            None,
            lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:1]}),
            rf"{Q}\.scales has shape \(1, 64\), expected \(2, 64\)",
        ),
        (
            "gptq",
            None,
            lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].float()}),
            rf"{Q}\.qweight has dtype torch\.float32",
        ),
        (
            "awq",
            None,
            lambda t: t.update({"model.layers.0.mlp.down_proj.bias": torch.ones(64)}),
            r"down_proj\.bias' is a nonzero bias",
        ),
        (
            "gptq-own-orders",
            None,
            None,
            r"up_proj\.g_idx differs from .*gate_proj\.g_idx; the two are fused",
        ),
    ],
)
def test_bad_checkpoints_name_the_field_or_tensor(
    folders: dict, folder: str, config: Any, tensors: Any, match: str, tmp_path: Path
) -> None:
    path = edited(folders[folder], tmp_path / "bad", config, tensors)
    with pytest.raises(ValueError, match=match):
        engine(path)


def test_flags_that_do_not_fit_the_checkpoint(folders: dict) -> None:
    with pytest.raises(ValueError, match=r"--quantization gptq does not match .*'awq'"):
        engine(folders["awq"], quantization="gptq")
    with pytest.raises(ValueError, match=r"--quantization fp8 does not match .*'gptq'"):
        engine(folders["gptq"], quantization="fp8")
    with pytest.raises(ValueError, match="does not quantize to 4 bits on load"):
        engine(folders["src"], quantization="awq")
    eng = engine(folders["awq"], quantization="awq")  # the flag may repeat the config
    assert isinstance(eng.runner.model.layers[0].mlp.down_proj, Int4Linear)


def test_a_stray_zero_bias_is_accepted(folders: dict, tmp_path: Path) -> None:
    def add_bias(t: dict) -> None:  # older GPTQ writers save a zero bias for every layer
        t[f"{Q}.bias"] = torch.zeros(64, dtype=torch.float16)

    eng = engine(edited(folders["gptq"], tmp_path / "bias", None, add_bias))
    assert eng.runner.model.layers[0].self_attn.qkv_proj.bias is None


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_dummy_int4_weights(method: str, folders: dict, tmp_path: Path) -> None:
    from tests.fp8_checkpoints import model_logits_of

    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    for f in folders["src"].iterdir():
        if f.suffix != ".safetensors":
            (cfg_only / f.name).write_bytes(f.read_bytes())
    eng = engine(cfg_only, load_format="dummy", quantization=method)
    model = eng.runner.model
    layer = model.layers[0].mlp.gate_up_proj
    assert isinstance(layer, Int4Linear) and layer.cfg.method == method
    assert layer.cfg.group_size == 64  # 128 does not divide the tiny model's hidden size 64
    assert not [n for n, _ in model.named_parameters() if n.endswith("proj.weight")]
    w = layer.int4_weight()
    from cuda.int4_gemm import dequantize_ref

    deq = dequantize_ref(w, torch.float32)
    # (q - 8) * 0.02 / 8 (scale rounded to fp16): within [-0.02, 0.0175]
    assert float(deq.max()) <= 0.0176 and float(deq.min()) >= -0.0201
    assert float(deq.std()) > 0.005  # random, not constant
    assert bool(torch.isfinite(model_logits_of(eng, [1, 5, 9, 13], True)).all())


def test_cpu_dequantized_copy_follows_new_weights() -> None:
    cfg = Int4Config.for_dummy("awq")
    layer = Int4Linear(128, 16, False, cfg)
    x = torch.randn(2, 128)
    from worker.quant.int4_linear import fill_dummy_int4

    fill_dummy_int4(layer, torch.Generator().manual_seed(0), 0.02)
    first = layer(x)
    assert torch.equal(layer(x), first)  # the cached copy
    fill_dummy_int4(layer, torch.Generator().manual_seed(1), 0.02)
    assert not torch.equal(layer(x), first)
