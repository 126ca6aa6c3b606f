"""AWQ and GPTQ tensors, packed by tests/int4_checkpoints.py from the formats' definitions,
unpack to exactly the quantized weights they encode."""

from __future__ import annotations

import pytest
import torch

from tests.int4_checkpoints import awq_tensors, dequantized, gptq_tensors, quantize_groups
from worker.quant.int4 import Int4Config, dequantize_awq, dequantize_gptq


def weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("group_size", [64, 128])
def test_awq_unpacks_to_the_encoded_weight(group_size: int) -> None:
    w = weight(48, 256, 0)
    t = awq_tensors(w, group_size)
    cfg = Int4Config.from_hf(
        {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
        }
    )
    q, z, s, g_idx = quantize_groups(w, group_size, sym=False)
    got = dequantize_awq(t["qweight"], t["qzeros"], t["scales"], cfg, torch.float32)
    torch.testing.assert_close(got, dequantized(q, z, s, g_idx), rtol=0, atol=0)
    assert (got - w).abs().max() < 0.2 * w.abs().max()  # and it is a quantization of w


@pytest.mark.parametrize(
    ("group_size", "sym", "desc_act"),
    [
        (128, True, False),
        (64, False, False),
        (-1, True, False),
        (64, True, True),
        (128, False, True),
    ],
)
def test_gptq_unpacks_to_the_encoded_weight(group_size: int, sym: bool, desc_act: bool) -> None:
    w = weight(40, 256, 1)
    t = gptq_tensors(w, group_size, sym, desc_act)
    cfg = Int4Config.from_hf(
        {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "sym": sym,
            "desc_act": desc_act,
        }
    )
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0)) if desc_act else None
    q, z, s, g_idx = quantize_groups(w, group_size, sym, perm)
    assert torch.equal(t["g_idx"], g_idx)
    got = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], cfg, torch.float32)
    torch.testing.assert_close(got, dequantized(q, z, s, g_idx), rtol=0, atol=0)
    assert (got - w).abs().max() < 0.25 * w.abs().max()


@pytest.mark.parametrize(
    ("qc", "field"),
    [
        ({"quant_method": "awq", "bits": 8, "group_size": 128}, "bits"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits"),
        ({"quant_method": "awq", "bits": 4, "group_size": 0}, "group_size"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version"),
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
            "checkpoint_format",
        ),
        ({"quant_method": "squeezellm", "bits": 4}, "quant_method"),
    ],
)
def test_unsupported_configs_name_the_field(qc: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Int4Config.from_hf(qc)


def test_shape_mismatches_name_the_tensor() -> None:
    t = gptq_tensors(weight(16, 128, 2), 64, True, False)
    cfg = Int4Config.from_hf({"quant_method": "gptq", "bits": 4, "group_size": 64})
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.scales"):
        dequantize_gptq(
            t["qweight"], t["qzeros"], t["scales"][:1], None, cfg, torch.float32, "layers.0.q_proj."
        )
    with pytest.raises(ValueError, match="g_idx is missing"):
        desc = Int4Config.from_hf(
            {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True}
        )
        dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], None, desc, torch.float32)
