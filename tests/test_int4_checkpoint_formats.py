"""AWQ and GPTQ checkpoints as their writers define them, beyond the common settings: AWQ
group sizes 32 / 128 / -1 and zero_point false, modules_to_not_convert; GPTQ group -1 /
32 / 64 / 128, sym and not, desc_act with g_idx, static_groups (act order with groups in
row order), checkpoint_format "gptq_v2" (zeros stored as they are, no - 1), lm_head true,
GPTQModel's `dynamic` skip patterns; settings in AutoGPTQ's quantize_config.json or
AutoAWQ's quant_config.json instead of config.json; sharded safetensors with a module's
parts in different shards; tied embeddings; and what we refuse, by field or tensor.

Checkpoints are packed here (tests/int4_checkpoints.py, from the formats' definitions)
from a tiny random Llama whose layers take group 128, beside a twin holding the
dequantized weights in fp32; both run the same fp32 math, so logits agree to rounding.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.int4_checkpoints import (
    dequantized,
    pack_awq,
    pack_gptq_cols,
    pack_gptq_rows,
    quantize_groups,
)
from tests.quant_checkpoints import engine, model_logits, save_folder
from tests.tiny_models import make_tiny_model
from worker.quant.int4_linear import Int4Linear

TOKENS = torch.randint(3, 512, (20,), generator=torch.Generator().manual_seed(9)).tolist()
# q/k/v and gate/up read the same input, so GPTQ's act order is the same for them.
SAME_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import STORIES

    path = tmp_path_factory.mktemp("int4fmt") / "llama"
    sizes = dict(hidden_size=128, intermediate_size=256, head_dim=16, num_hidden_layers=2)
    return make_tiny_model("llama", path, STORIES, **sizes)


def pack(
    w: torch.Tensor, module: str, method: str, group: int, sym: bool, order: str, v2: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the module's tensors, the fp32 weight they encode). order: "rows" (no act order),
    "act" (desc_act: a random input order, shared by fused shards) or "static" (act order
    with static_groups: GPTQ quantizes in act order, but groups stay in row order, so the
    saved g_idx is sorted)."""
    perm = None
    if order == "act":
        parent, _, proj = module.rpartition(".")
        seed = zlib.crc32(f"{parent}.{SAME_INPUT.get(proj, proj)}".encode())
        perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))
    q, z, s, g_idx = quantize_groups(w, group, sym, perm)
    deq = dequantized(q, z, s, g_idx)
    if method == "awq":
        return {"qweight": pack_awq(q), "qzeros": pack_awq(z), "scales": s}, deq
    zeros = pack_gptq_cols(z if v2 else z - 1)  # AutoGPTQ's v1 stores zero - 1
    return {"qweight": pack_gptq_rows(q), "qzeros": zeros, "scales": s, "g_idx": g_idx}, deq


def write_int4_pair(
    src: Path,
    dest: Path,
    qc: dict[str, Any],
    order: str = "rows",
    v2: bool = False,
    keep_16bit: Any = lambda module: False,
    lm_head: bool = False,
    shards: int = 1,
    side_file: str | None = None,
    edit: Any = None,
) -> tuple[Path, Path]:
    """(4-bit folder, dequantized fp32 twin). side_file: write qc there, not into
    config.json's quantization_config."""
    method = qc.get("quant_method", "awq" if "w_bit" in qc else "gptq")
    group = qc.get("group_size", qc.get("q_group_size"))
    sym = qc.get("sym", False) if method == "gptq" else False
    tensors = load_file(str(src / "model.safetensors"))
    packed, deq = {}, {}
    for name, w in tensors.items():
        module = name.removesuffix(".weight")
        linear = name.endswith("_proj.weight") or (lm_head and module == "lm_head")
        if not linear or keep_16bit(module):
            packed[name] = deq[name] = w
            continue
        parts, deq[name] = pack(w, module, method, group, sym, order, v2)
        packed |= {f"{module}.{p}": t for p, t in parts.items()}
    if edit is not None:
        edit(packed)
    config = json.loads((src / "config.json").read_text())
    side = {side_file: qc} if side_file else None
    qconfig = config if side_file else config | {"quantization_config": qc}
    int4_dir = save_folder(src, dest / "int4", packed, qconfig, shards, side)
    return int4_dir, save_folder(src, dest / "deq", deq, config)


def check_same(int4_dir: Path, deq_dir: Path, **engine_args: Any) -> None:
    got, want = model_logits(int4_dir, TOKENS, **engine_args), model_logits(deq_dir, TOKENS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))  # greedy tokens


def awq(group: int, **more: Any) -> dict[str, Any]:
    return (
        {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True}
        | {"version": "gemm"}
        | more
    )


def gptq(group: int, sym: bool, desc_act: bool, **more: Any) -> dict[str, Any]:
    qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym}
    qc |= {"desc_act": desc_act, "true_sequential": True, "static_groups": False}
    return qc | {"damp_percent": 0.01, "lm_head": False} | more


@pytest.mark.parametrize(
    ("qc", "order", "v2"),
    [
        (awq(128), "rows", False),
        (awq(-1), "rows", False),  # AutoAWQ: -1 is one group over all inputs
        (awq(32, zero_point=False), "rows", False),  # qzeros still written and read
        (gptq(-1, True, False), "rows", False),
        (gptq(128, False, False), "rows", False),
        (gptq(32, True, True), "act", False),
        (gptq(64, False, False, checkpoint_format="gptq_v2"), "rows", True),
        (gptq(32, False, True, checkpoint_format="gptq_v2"), "act", True),
        (gptq(64, False, True, static_groups=True), "static", False),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
def test_int4_variants_equal_their_dequantized_twin(llama, tmp_path, qc, order, v2):
    int4_dir, deq_dir = write_int4_pair(llama, tmp_path, qc, order, v2)
    check_same(int4_dir, deq_dir)
    layer = engine(int4_dir).runner.model.layers[1].mlp.gate_up_proj
    assert isinstance(layer, Int4Linear) and layer.reorders == (order == "act")


def test_gptq_v2_zero_points_of_zero(tmp_path, llama):
    """v2 exists because v1's zero - 1 cannot hold a zero point of 0: all-positive
    weights (asymmetric groups whose minimum is the zero point 0) must load exactly."""
    tensors = load_file(str(llama / "model.safetensors"))
    for name in tensors:
        if name.endswith("_proj.weight"):
            tensors[name] = tensors[name].abs() + 0.01
    config = json.loads((llama / "config.json").read_text())
    src = save_folder(llama, tmp_path / "positive", tensors, config)
    qc = gptq(32, False, False, checkpoint_format="gptq_v2")
    int4_dir, deq_dir = write_int4_pair(src, tmp_path, qc, v2=True)
    check_same(int4_dir, deq_dir)


def test_gptq_quantized_lm_head(llama, tmp_path):
    """lm_head: true quantizes the head too; it is dequantized on load (kept 16-bit)."""
    int4_dir, deq_dir = write_int4_pair(
        llama, tmp_path, gptq(32, False, True, lm_head=True), "act", lm_head=True
    )
    assert "lm_head.qweight" in load_file(str(int4_dir / "model.safetensors"))
    check_same(int4_dir, deq_dir)
    assert not isinstance(engine(int4_dir).runner.model.lm_head, Int4Linear)


@pytest.mark.parametrize(
    ("qc", "kept"),
    [
        (awq(64, modules_to_not_convert=["down_proj"]), lambda m: m.endswith("down_proj")),
        (  # GPTQModel: "-:" skips; a "+:" override equal to the base settings is allowed
            gptq(
                64,
                True,
                False,
                dynamic={r"-:model\.layers\.1\.mlp": {}, r"+:.*o_proj": {"bits": 4}},
            ),
            lambda m: m.startswith("model.layers.1.mlp."),
        ),
    ],
)
def test_modules_left_16bit(llama, tmp_path, qc, kept):
    int4_dir, deq_dir = write_int4_pair(llama, tmp_path, qc, keep_16bit=kept)
    check_same(int4_dir, deq_dir)
    layers = engine(int4_dir).runner.model.layers
    assert not isinstance(layers[1].mlp.down_proj, Int4Linear)
    assert isinstance(layers[1].self_attn.o_proj, Int4Linear)
    assert isinstance(layers[0].mlp.gate_up_proj, Int4Linear)
    assert isinstance(layers[1].mlp.gate_up_proj, Int4Linear) == (qc["quant_method"] == "awq")


@pytest.mark.parametrize(
    ("qc", "side_file", "flag"),
    [
        # AutoGPTQ's quantize_config.json without quant_method (older releases)
        (
            {"bits": 4, "group_size": 64, "desc_act": True, "sym": False},
            "quantize_config.json",
            None,
        ),
        (
            {"bits": 4, "group_size": 64, "desc_act": False, "sym": True},
            "quantize_config.json",
            "gptq",
        ),
        # AutoAWQ's quant_config.json
        (
            {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"},
            "quant_config.json",
            None,
        ),
    ],
)
def test_side_file_settings_and_shards(llama, tmp_path, qc, side_file, flag):
    order = "act" if qc.get("desc_act") else "rows"
    int4_dir, deq_dir = write_int4_pair(llama, tmp_path, qc, order, shards=3, side_file=side_file)
    assert (int4_dir / "model.safetensors.index.json").exists()
    check_same(int4_dir, deq_dir, quantization=flag)
    assert isinstance(engine(int4_dir).runner.model.layers[0].mlp.down_proj, Int4Linear)


def test_side_file_checkpoints_are_not_split(llama, tmp_path):
    """Tensor parallel refuses 4-bit checkpoints; one whose settings are in a side file too."""
    from worker.parallel.plan import check_checkpoint_splits

    qc = {"bits": 4, "group_size": 64, "desc_act": False, "sym": True}
    int4_dir, _ = write_int4_pair(llama, tmp_path, qc, side_file="quantize_config.json")
    config = json.loads((int4_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"gptq checkpoints .* cannot be split"):
        check_checkpoint_splits(config, None, 2, str(int4_dir))


def test_tied_embeddings(tmp_path, stories_path):
    src = make_tiny_model("qwen2", tmp_path / "qwen2", stories_path)
    int4_dir, deq_dir = write_int4_pair(src, tmp_path, awq(32))
    check_same(int4_dir, deq_dir)
    model = engine(int4_dir).runner.model
    assert model.lm_head.weight is model.embed_tokens.weight


Q = "model.layers.0.self_attn.q_proj"
BAD = [
    (gptq(128, True, False, bits=3), None, r"quantization_config\.bits is 3"),
    (gptq(128, True, False, bits=2), None, r"quantization_config\.bits is 2"),
    (gptq(128, True, False, bits=8), None, r"quantization_config\.bits is 8"),
    (awq(128, version="gemv"), None, r"quantization_config\.version 'gemv'"),
    (awq(128, version="marlin"), None, r"quantization_config\.version 'marlin'"),
    (gptq(128, True, False, checkpoint_format="marlin"), None, r"checkpoint_format 'marlin'"),
    (gptq(128, True, False, is_marlin_format=True), None, r"is_marlin_format true"),
    (
        gptq(128, True, False, dynamic={r"+:.*down_proj": {"bits": 8}}),
        None,
        r"quantization_config\.dynamic\['\+:\.\*down_proj'\] sets \{'bits': 8\}",
    ),
    (gptq(128, True, False), lambda t: t.pop(f"{Q}.scales"), rf"missing tensors: {Q}\.scales"),
    (awq(32, zero_point=False), lambda t: t.pop(f"{Q}.qzeros"), rf"missing tensors: {Q}\.qzeros"),
    (gptq(32, True, True), lambda t: t.pop(f"{Q}.g_idx"), rf"missing tensors: {Q}\.g_idx"),
    (
        gptq(128, True, False),
        lambda t: t.update({f"{Q}.qzeros": t[f"{Q}.qzeros"][:, :4]}),
        rf"{Q}\.qzeros has shape \(1, 4\), expected \(1, 16\)",
    ),
]


@pytest.mark.parametrize(("qc", "edit", "match"), BAD)
def test_refused_with_the_field_or_tensor_named(llama, tmp_path, qc, edit, match):
    int4_dir, _ = write_int4_pair(
        llama, tmp_path, qc, "act" if qc.get("desc_act") else "rows", edit=edit
    )
    with pytest.raises(ValueError, match=match):
        engine(int4_dir)


def test_quantized_tensors_without_a_config(llama, tmp_path):
    int4_dir, _ = write_int4_pair(llama, tmp_path, gptq(128, True, False))
    config = json.loads((int4_dir / "config.json").read_text())
    del config["quantization_config"]
    (int4_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"unexpected tensor .* \(a quantized tensor, but config.json has no"
    ):
        engine(int4_dir)


def test_flags_that_do_not_fit(llama, tmp_path):
    int4_dir, _ = write_int4_pair(llama, tmp_path, gptq(128, True, False))
    with pytest.raises(ValueError, match=r"--quantization awq does not match .*'gptq'"):
        engine(int4_dir, quantization="awq")
    with pytest.raises(ValueError, match=r"--quantization fp8 does not match .*'gptq'"):
        engine(int4_dir, quantization="fp8")
    from tests.test_fp8_formats import ct_config, write_fp8_pair

    fp8_dir, _ = write_fp8_pair(llama, tmp_path / "fp8", ct_config())
    with pytest.raises(
        ValueError, match=r"--quantization gptq does not match .*'compressed-tensors'"
    ):
        engine(fp8_dir, quantization="gptq")
