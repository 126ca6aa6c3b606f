"""The tiles layout (cuda/int4_tiles.py) and the indexing of its kernels, on CPU.

gemv_tiles and dequant_tiles cannot run here, so their index arithmetic is replayed in
torch: the GEMV lane by lane with the mma.m16n8k16 fragment tables of the PTX ISA
(written out below from the ISA, independently of the layout code), the dequant thread
by thread. A wrong nibble, lane, k-step or x offset lands far from the reference.
"""

from __future__ import annotations

import pytest
import torch

from cuda import int4_gemm as ig
from cuda.int4_tiles import from_tiles, tiles_ok, to_tiles

# PTX ISA, mma.m16n8k16 (.bf16/.f16), g = lane // 4, c = lane % 4:
#   A element i (register i // 2, low half first): row g + 8 * (i in {2,3,6,7}),
#                                                  col 2c + (i & 1) + 8 * (i >= 4)
#   B element i (register i // 2): row 2c + (i & 1) + 8 * (i >= 2), col g
#   C element i: row g + 8 * (i >= 2), col 2c + (i & 1)


def a_pos(lane: int, i: int) -> tuple[int, int]:
    g, c = lane // 4, lane % 4
    return g + 8 * (i in (2, 3, 6, 7)), 2 * c + (i & 1) + 8 * (i >= 4)


def b_pos(lane: int, i: int) -> tuple[int, int]:
    g, c = lane // 4, lane % 4
    return 2 * c + (i & 1) + 8 * (i >= 2), g


def c_pos(lane: int, i: int) -> tuple[int, int]:
    g, c = lane // 4, lane % 4
    return g + 8 * (i >= 2), 2 * c + (i & 1)


def random_weight(n: int, k: int, group: int, seed: int) -> ig.Int4Weight:
    g = torch.Generator().manual_seed(seed)
    return ig.Int4Weight(
        qw=ig.pack_rows(torch.randint(0, 16, (n, k), generator=g)),
        scales=(torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half(),
        zeros=torch.randint(0, 17, (n, k // group), generator=g).to(torch.uint8),  # GPTQ: 16
        group_size=group,
    )


def emulate_gemv_tiles(x: torch.Tensor, w: ig.Int4Weight) -> torch.Tensor:
    """gemv_tiles' arithmetic, lane by lane, as cuda/int4_gemm.cu writes it."""
    m_rows, k = x.shape
    n = w.out_features
    qt = w.qw.view(torch.int32).reshape(-1).tolist()  # flat words, tile order
    y = torch.zeros(m_rows, n, dtype=torch.float64)
    tiles_k = k // 64
    for tn in range(n // 16):
        for tk in range(tiles_k):
            gi = tk * 64 // w.group_size
            t = torch.zeros(32, 4, dtype=torch.float64)  # per lane, C registers
            for i in range(4):  # k-steps
                a_mat = torch.full((16, 16), float("nan"), dtype=torch.float64)
                b_mat = torch.full((16, 8), float("nan"), dtype=torch.float64)
                for lane in range(32):
                    g, c = lane // 4, lane % 4
                    word = qt[((tn * tiles_k + tk) * 32 + lane) * 4 + i] & 0xFFFFFFFF
                    for s in range(4):  # A register s: nibbles s and s + 4, minus z
                        ch = tn * 16 + g + 8 * (s & 1)
                        z = int(w.zeros[ch, gi])
                        for half, nib in enumerate((s, s + 4)):
                            r, col = a_pos(lane, 2 * s + half)
                            a_mat[r, col] = ((word >> (4 * nib)) & 0xF) - z
                    row = g if g < m_rows else 0
                    xs = x[row, tk * 64 + 16 * c : tk * 64 + 16 * c + 16].double()
                    b_vals = [xs[4 * i], xs[4 * i + 1], xs[4 * i + 2], xs[4 * i + 3]]
                    for e in range(4):
                        r, col = b_pos(lane, e)
                        b_mat[r, col] = b_vals[e]
                assert not a_mat.isnan().any() and not b_mat.isnan().any()
                c_mat = a_mat @ b_mat
                for lane in range(32):
                    for e in range(4):
                        t[lane, e] += c_mat[c_pos(lane, e)]
            for lane in range(32):
                g = lane // 4
                for e in range(4):
                    r, m = c_pos(lane, e)
                    ch = tn * 16 + r
                    assert r == g + 8 * (e >= 2)  # the kernel scales e < 2 by row g's s0
                    if m < m_rows:
                        y[m, ch] += float(w.scales[ch, gi]) * t[lane, e]
    return y


def emulate_dequant_tiles(w: ig.Int4Weight) -> torch.Tensor:
    """dequant_tiles' index arithmetic, thread by thread."""
    n, k = w.out_features, w.in_features
    qt = w.qw.reshape(-1).tolist()
    out = torch.empty(n, k, dtype=torch.float64)
    for row in range(n):
        for k0 in range(0, k, 8):
            gi = k0 // w.group_size
            s, z = float(w.scales[row, gi]), float(w.zeros[row, gi])
            r, kk = row % 16, k0 % 64
            c, h = kk // 16, (kk % 16) // 8
            tile = (row // 16) * (k // 64) + k0 // 64
            base = (tile * 32 + (r & 7) * 4 + c) * 4
            for i in range(2):
                word = qt[base + 2 * h + i] & 0xFFFFFFFF
                for o in range(4):
                    nib = (r >> 3) + 2 * (o >> 1) + 4 * (o & 1)
                    out[row, k0 + 4 * i + o] = (((word >> (4 * nib)) & 0xF) - z) * s
    return out


def test_tiles_round_trip_and_shapes() -> None:
    w = random_weight(48, 256, 64, 0)
    qt = to_tiles(w.qw)
    assert qt.shape == w.qw.shape and not torch.equal(qt, w.qw)
    assert torch.equal(from_tiles(qt), w.qw)
    assert tiles_ok(4096, 14336, 128) and not tiles_ok(4104, 4096, 128)
    assert not tiles_ok(4096, 4096, 32)  # a 64-wide tile must lie in one group
    with pytest.raises(ValueError, match="group_size 32"):
        random_weight(48, 256, 32, 0).as_tiles()


def test_gemv_tiles_indexing_computes_the_matmul() -> None:
    w = random_weight(32, 256, 128, 1).as_tiles()
    for m in (1, 3, 8):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).bfloat16()
        want = x.double() @ ig.dequantize_ref(w, torch.float64).t()
        torch.testing.assert_close(emulate_gemv_tiles(x, w), want, rtol=1e-9, atol=1e-9)


def test_dequant_tiles_indexing_and_reference() -> None:
    w = random_weight(32, 192, 64, 2)
    t = w.as_tiles()
    want = ig.dequantize_ref(w, torch.float64)
    assert torch.equal(ig.dequantize_ref(t, torch.float64), want)
    torch.testing.assert_close(emulate_dequant_tiles(t), want, rtol=0, atol=1e-12)
    x = torch.randn(5, 192)
    torch.testing.assert_close(ig.int4_linear(x, t), ig.int4_linear(x, w))  # CPU: reference


def test_tiles_launch_grid_and_args() -> None:
    w = random_weight(64, 256, 128, 3).as_tiles()
    x = torch.zeros(6, 256, dtype=torch.bfloat16)
    name, grid, args = ig.tiles_launch(x, w, torch.empty(6, 64, dtype=torch.bfloat16))
    assert name == "gemv_tiles" and grid == (4,)  # one block per 16 channels
    assert args[7] == 64 and args[8] == 256 and args[9] == 128 and args[10] == 6


def test_int4_linear_keeps_its_outputs_in_the_tiles_layout() -> None:
    from worker.quant.int4 import Int4Config
    from worker.quant.int4_linear import Int4Linear, fill_dummy_int4

    layer = Int4Linear(256, 48, True, Int4Config.for_dummy("gptq"))
    fill_dummy_int4(layer, torch.Generator().manual_seed(0), 0.02)
    layer.bias.data.normal_()
    x = torch.randn(3, 256)
    want = layer(x)
    assert layer.use_tiles() and layer.layout == "tiles"
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    odd = Int4Linear(256, 40, False, Int4Config.for_dummy("gptq"))  # 40 rows: not 16-aligned
    assert not odd.use_tiles() and odd.layout == "rows"
