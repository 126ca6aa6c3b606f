"""Round 4 of the int4 GEMV (cuda/int4_v4_gemv.*) on CPU: the stream layout's packing, the
kernel's fragment math emulated lane by lane against the reference (groups 64 and up), the
rule per shape, launch arguments and the int4_linear path (sm_90 compiles:
tests/test_kernels_compile.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from cuda import compiler
from cuda import int4_gemm as ig
from cuda import int4_v4_gemv as v4
from tests.int4_v4_emulation import emulate
from tests.test_cuda_launch_args import _OnDevice, kernel_parameters
from tests.test_int4_mma_gemv import weight


def stream_weight(n: int, k: int, group_size: int, seed: int) -> ig.Int4Weight:
    return weight(n, k, group_size, seed, zmax=16).as_stream()


def test_packing_round_trips_and_is_a_permutation() -> None:
    w = weight(48, 384, 128, seed=1)
    qs = v4.to_stream(w.qw)
    assert qs.shape == w.qw.shape and qs.dtype == torch.int32
    torch.testing.assert_close(v4.from_stream(qs), w.qw, rtol=0, atol=0)
    nib = ig.unpack_rows(w.qw).flatten().sort().values
    assert torch.equal(ig.unpack_rows(qs).flatten().sort().values, nib)
    assert not torch.equal(qs, w.qw)


def test_packing_in_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    w = weight(64, 256, 128, seed=2)
    whole = v4.to_stream(w.qw)
    monkeypatch.setattr(v4, "CHUNK_NIBBLES", 16 * 256)  # one tile row a pass: four passes
    assert torch.equal(v4.to_stream(w.qw), whole)


def test_unit_map_matches_the_kernel_header() -> None:
    """Lane 4 g + c's vector j word w nibble s + 4 h holds channel g + 8 (s & 1), input
    32 (ks // 2) + 8 c + 4 (ks % 2) + 2 (s >> 1) + h, ks = 4 j + w (the .cu's comment)."""
    idx = v4._unit_index(torch.device("cpu")).view(2, 32, 4, 8)
    assert sorted(idx.flatten().tolist()) == list(range(16 * 128))
    r, k = idx // 128, idx % 128
    assert (k[0] < 64).all() and (k[1] >= 64).all()  # vector j: one half k-block (group 64)
    assert r[0, 4 * 3 + 1, 2, 1].item() == 3 + 8 and k[0, 4 * 3 + 1, 2, 1].item() == 32 + 8
    assert k[1, 2, 3, 6].item() == 32 * 3 + 8 * 2 + 4 + 2 + 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "n", "k", "group_size", "wk"),
    [(1, 16, 128, 128, 1), (3, 32, 512, 64, 4), (8, 48, 768, 256, 2), (5, 16, 1024, 1024, 16)],
)
def test_emulated_kernel_equals_reference(
    dtype: torch.dtype, m: int, n: int, k: int, group_size: int, wk: int
) -> None:
    # zeros up to 16 (GPTQ's stored zero + 1), group 64, empty warps (1024 / 128 < 16).
    w = stream_weight(n, k, group_size, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    got = emulate(x, w, wk)
    ref = ig.int4_linear_ref(x.double(), w).numpy()
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_emulation_catches_a_wrong_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check has teeth: B registers of odd k-steps from the even ones' inputs."""
    from tests import int4_v4_emulation as em

    w = stream_weight(16, 256, 64, seed=3)
    x = torch.randn(2, 256).to(torch.bfloat16)
    real = em.mma
    monkeypatch.setattr(em, "mma", lambda t, a, b, d: real(t, a, [b[0], b[0]], d))
    got = emulate(x, w, 2)
    ref = ig.int4_linear_ref(x.double(), w).numpy()
    assert np.abs(got - ref).max() > 1e-3 * np.abs(ref).max()


def test_source_has_the_emulated_constants() -> None:
    text = v4.source()
    for const in ("0x43004300u", "0x64006400u", "0x3F803F80u", "0x3C003C00u", "0x2C002C00u"):
        assert const in text
    for const in ("0xC300C300u", "0xE400E400u", "0xD400D400u", "v4_mma(t, a, xv.z, xv.w)"):
        assert const in text


# The rule's pick per Llama shape, with why (module docstring): every warp resident.
RULE = {
    (6144, 4096): 8,  # 384 tiles x 16 warps = 6144 > 4224 slots
    (4096, 4096): 16,  # 256 x 16 = 4096, 2 k-blocks a warp
    (28672, 4096): 2,  # 1792 tiles x 4 = 7168 would be 1.7 waves
    (4096, 14336): 16,
    (10240, 8192): 4,
    (8192, 8192): 8,
    (57344, 8192): 1,  # 3584 warps, 64 k-blocks each
    (8192, 28672): 8,
}


def test_rule_on_llama_shapes() -> None:
    assert {shape: v4.choose(*shape, 132)[0] for shape in RULE} == RULE
    assert {v4.choose(*shape, 132)[1] for shape in RULE} == {4}
    assert v4.choose(16, 128, 132) == (1, 4)  # one k-block: no split
    assert v4.choose(16, 512, 132) == (2, 4)  # MIN_RUN k-blocks a warp
    assert v4.choose(16 * 10**5, 4096, 132) == (1, 4)  # too tall for one wave
    assert all(v4.choose(n, 4096, 132) in v4.VARIANTS for n in (16, 1008, 4096, 10**5 * 16))
    assert "8B" not in v4.explain(4096, 4096) and "w16_s4: 256 tiles" in v4.explain(4096, 4096)


def test_residency() -> None:
    # 64 registers: 32 warps; S = 6 at 16 warps: 96 KB a block, 2 blocks.
    assert v4.resident_warps(16, 4) == 32 and v4.resident_warps(16, 6) == 32
    assert v4.resident_warps(1, 6) == 32  # 32 blocks of 7 KB
    assert all(v4.shmem(*v) <= v4.SMEM_BLOCK for v in v4.VARIANTS)


def test_supported_shapes() -> None:
    assert v4.supported(4096, 4096, 128) and v4.supported(4096, 4096, 64)
    assert v4.supported(16, 14336, 2048) and not v4.supported(16, 14336, 4096)  # K % gs
    assert not v4.supported(4096, 4096, 32) and not v4.supported(4096, 4096, 96)
    assert not v4.supported(40, 4096, 128)  # N % 16
    assert not v4.supported(4096, 576, 64)  # K % 128


def test_forced_variant() -> None:
    assert v4.forced_variant("") is None and v4.forced_variant("w8_s6") == (8, 6)
    with pytest.raises(ValueError, match="HEADRACE_INT4_V4_VARIANT"):
        v4.forced_variant("w3_s4")


@pytest.mark.parametrize(
    ("m", "n", "k", "gs"), [(1, 4096, 4096, 128), (8, 96, 512, 64), (20, 48, 14336, 128)]
)
def test_v4_launch_arguments(
    monkeypatch: pytest.MonkeyPatch, m: int, n: int, k: int, gs: int
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(v4, "_kernel", lambda dtype, name: name)
    monkeypatch.setattr(v4, "_sms", lambda device: 132)
    monkeypatch.setattr(v4, "_device_index", lambda device: 0)
    # 20 rows as 8-row GEMVs, as before the skinny GEMM (tests/test_int4_skinny.py)
    monkeypatch.setattr(ig, "SKINNY_MAX_ROWS", 0)
    opted: list[Any] = []
    monkeypatch.setattr(compiler, "allow_shared_memory", lambda *a: opted.append(a))
    monkeypatch.setattr(
        compiler, "launch", lambda *c, shmem=0, pdl=False: calls.append((*c, shmem))
    )
    monkeypatch.setenv("HEADRACE_PDL", "0")
    w = stream_weight(n, k, gs, seed=3)
    x = torch.randn(m, k + 8, dtype=torch.bfloat16)[:, :k].as_subclass(_OnDevice)  # strided
    y = torch.empty(m, n, dtype=torch.bfloat16)
    assert ig.int4_linear(x, w, out=y) is y
    text = v4.source()
    macro = text[text.index("#define HR_V4_ARGS") : text.index("#define HR_V4_PASS")]
    signature = kernel_parameters(macro + '\nextern "C" __global__ void s(HR_V4_ARGS) {}\n')["s"]
    wk, s = v4.choose(n, k, 132)
    assert len(calls) == -(-m // 8)
    for i, (kernel, grid, block, *args, shmem) in enumerate(calls):
        assert (kernel, tuple(grid), block, shmem) == (
            v4.kernel_name(wk, s),
            (n // 16,),
            wk * 32,
            wk * s * 1024,
        )
        assert [type(a) for a in args] == [t for _, t in signature]
        got = dict(zip([name for name, _ in signature], args, strict=True))
        assert got["x"] == x.data_ptr() + 8 * i * (k + 8) * 2 and got["x_stride"] == k + 8
        assert got["y"] == y.data_ptr() + 8 * i * n * 2 and got["y_stride"] == n
        assert (got["N"], got["K"], 1 << got["group_shift"], got["M"]) == (
            n,
            k,
            gs,
            min(8, m - 8 * i),
        )
        assert got["lo_mask"] == 0x000F000F
    # the opt-in (past 48 KB) and the largest carveout, for every variant
    assert opted == [(v4.kernel_name(wk, s), wk * s * 1024, 0)] * len(calls)


def test_more_than_32_rows_dequantize_the_stream_layout() -> None:
    w = stream_weight(32, 256, 64, seed=5)
    x = torch.randn(33, 256)
    ref = ig.int4_linear_ref(x, w)  # CPU: from_stream, then the reference
    plain = ig.int4_linear_ref(x, weight(32, 256, 64, seed=5))
    torch.testing.assert_close(ref, plain)


def test_int4_linear_keeps_its_outputs_in_the_stream_layout() -> None:
    from worker.quant.int4 import Int4Config
    from worker.quant.int4_linear import Int4Linear, fill_dummy_int4

    layer = Int4Linear(256, 48, True, Int4Config.for_dummy("awq"))
    fill_dummy_int4(layer, torch.Generator().manual_seed(0), 0.02)
    layer.bias.data.normal_()
    x = torch.randn(3, 256)
    want = layer(x)
    assert layer.use_stream() and layer.layout == "stream" and layer.use_stream()
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    odd = Int4Linear(256, 40, False, Int4Config.for_dummy("awq"))  # 40 rows: not 16-aligned
    assert not odd.use_stream() and odd.layout == "rows"


def test_prepare_repacks_only_with_v4(monkeypatch: pytest.MonkeyPatch) -> None:
    """HEADRACE_INT4_GEMV=v4 (the default) repacks what the kernel takes at load, up to
    STREAM_MAX_WEIGHTS weights; mma does not."""
    from torch import nn

    from worker.quant import int4_linear as il
    from worker.quant.int4 import Int4Config

    monkeypatch.setattr(il.int4_gemv, "workspace", lambda device: None)
    assert ig.GEMV_IMPL == "v4" or "HEADRACE_INT4_GEMV" in __import__("os").environ
    cases = (("mma", 1 << 30, ["rows", "rows"]), ("v4", 1 << 30, ["stream", "rows"]))
    for impl, most, want in (*cases, ("v4", 256 * 64 - 1, ["rows", "rows"])):
        monkeypatch.setattr(ig, "GEMV_IMPL", impl)
        monkeypatch.setattr(ig, "STREAM_MAX_WEIGHTS", most)
        cfg = Int4Config.for_dummy("awq")
        model = nn.Sequential(
            il.Int4Linear(256, 64, False, cfg), il.Int4Linear(256, 40, False, cfg)
        )
        for m in il.int4_layers(model):
            m.qweight.data.zero_()
        with monkeypatch.context() as mp:
            mp.setattr(torch, "empty", lambda *a, **k: torch.zeros(1))  # no GPU scratch
            il.prepare_int4_layers(model, torch.bfloat16, torch.device("cuda"))
        assert [m.layout for m in il.int4_layers(model)] == want


@pytest.mark.parametrize("group_size", [64, 128, 512])
def test_dequant_kernel_index_math(group_size: int) -> None:
    from tests.int4_v4_emulation import dequant_rows

    w = stream_weight(32, 512, group_size, seed=group_size)
    ref = ig.dequantize_ref(w, torch.float32).double().numpy()
    np.testing.assert_allclose(dequant_rows(w), ref, rtol=1e-6, atol=1e-7)
    text = v4.source()
    assert "qv[(unit * V4_UNIT + 32 * (ks / 4) + 4 * g + c) * 4 + ks % 4]" in text
    assert "const int nib = hi + 2 * (o >> 1) + 4 * (o & 1);" in text


def test_v4_runs_round_3_on_rows_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under HEADRACE_INT4_GEMV=v4 a weight the stream layout cannot take (here N % 16)
    keeps the default tensor-core GEMV, not gemv_m*."""
    from cuda import int4_mma_gemv as mg

    calls: list[Any] = []
    monkeypatch.setattr(ig, "GEMV_IMPL", "v4")
    monkeypatch.setattr(mg, "gemv", lambda x, w, y, variant=None: calls.append("mma"))
    monkeypatch.setattr(v4, "gemv", lambda *a, **k: pytest.fail("v4 on a rows weight"))
    w = weight(40, 512, 128, seed=6)
    x = torch.randn(2, 512, dtype=torch.bfloat16).as_subclass(_OnDevice)
    ig.int4_linear(x, w, out=torch.empty(2, 40, dtype=torch.bfloat16))
    assert calls == ["mma"]


def test_pdl_follows_headrace_pdl(monkeypatch: pytest.MonkeyPatch) -> None:
    """HEADRACE_PDL=1 launches round 4 by Programmatic Dependent Launch (the .cu waits
    before it reads x); unset, plainly."""
    pdls: list[bool] = []
    monkeypatch.setattr(v4, "_kernel", lambda dtype, name: name)
    monkeypatch.setattr(v4, "_sms", lambda device: 132)
    monkeypatch.setattr(v4, "_device_index", lambda device: 0)
    monkeypatch.setattr(compiler, "allow_shared_memory", lambda *a: None)
    monkeypatch.setattr(compiler, "launch", lambda *c, shmem=0, pdl=False: pdls.append(pdl))
    w = stream_weight(64, 512, 128, seed=7)
    x = torch.randn(1, 512, dtype=torch.bfloat16).as_subclass(_OnDevice)
    for value in ("1", "0"):
        monkeypatch.setenv("HEADRACE_PDL", value)
        ig.int4_linear(x, w, out=torch.empty(1, 64, dtype=torch.bfloat16))
    assert pdls == [True, False]
    text = v4.source()
    assert text.index("v4_griddep_wait();") < text.index("__ldg(xr)")  # x only after the wait
