"""The split-K W4A16 GEMV (cuda/int4_gemv.cu) on CPU: its per-shape rule, and its thread
mapping and arithmetic replayed in numpy (the nibble-to-float bit trick, the staged x and
its per-chunk sums, the split partials and the last-block sum) against the float64
dequantize-then-matmul reference. The GPU runs the same cases in tests/gpu/test_gpu_int4.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cuda import int4_gemm as ig
from cuda import int4_gemv as sk

SHAPES = {  # Llama-3-8B and 70B linear layers: (N, K)
    "8b.qkv": (6144, 4096),
    "8b.o": (4096, 4096),
    "8b.gate_up": (28672, 4096),
    "8b.down": (4096, 14336),
    "70b.qkv": (10240, 8192),
    "70b.gate_up": (57344, 8192),
    "70b.down": (8192, 28672),
}


def random_weight(n: int, k: int, group_size: int, seed: int) -> ig.Int4Weight:
    g = torch.Generator().manual_seed(seed)
    return ig.Int4Weight(
        qw=ig.pack_rows(torch.randint(0, 16, (n, k), generator=g)),
        scales=(torch.rand(n, k // group_size, generator=g) * 0.02 + 0.001).half(),
        zeros=torch.randint(0, 17, (n, k // group_size), generator=g).to(torch.uint8),
        group_size=group_size,
    )


def magic_floats(words: np.ndarray) -> np.ndarray:
    """[..., 4] uint32 words -> [..., 32] float32, as dot8 builds them (input 8i + j)."""
    w = words.astype(np.uint64)
    mask = 0xFFFFFFFF
    parts = [
        (w << 16) & 0x000F0000,
        (w << 8) & 0x0000F000,
        (w << 8) & 0x000F0000,
        w & 0x0000F000,
        w & 0x000F0000,
        (w >> 8) & 0x0000F000,
        (w >> 8) & 0x000F0000,
        (w >> 16) & 0x0000F000,
    ]
    bits = np.stack([(p & mask) | 0x3F800000 for p in parts], axis=-1).astype(np.uint32)
    return bits.view(np.float32).reshape(*words.shape[:-1], 32)


def stage_x(x: np.ndarray, c_lo: int, nc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """stage_x: x's chunks as fp32 with odd inputs x 16, and per chunk (C, X)."""
    xs = x[:, c_lo * 32 : (c_lo + nc) * 32].reshape(x.shape[0], nc, 32).astype(np.float32)
    xs = xs * np.where(np.arange(32) % 2 == 1, 16, 1).astype(np.float32)
    c_sum = np.add.accumulate(xs, axis=-1, dtype=np.float32)[..., -1]
    x_sum = np.add.accumulate(xs / np.where(np.arange(32) % 2 == 1, 16, 1), axis=-1)[..., -1]
    return xs, c_sum.astype(np.float32), x_sum.astype(np.float32)


def emulate(x: torch.Tensor, w: ig.Int4Weight, plan: sk.Plan) -> tuple[np.ndarray, np.ndarray]:
    """(y [M, N], how often each element was written), thread by thread as the kernel."""
    xf = x.float().numpy()
    m_rows, (n, k) = x.shape[0], (w.out_features, w.in_features)
    chunks, cpg, groups = k // 32, w.group_size // 32, k // w.group_size
    f = magic_floats(w.qw.numpy().view(np.uint32).reshape(n, chunks, 4))
    scales, zeros = w.scales.float().numpy(), w.zeros.numpy().astype(np.float32)
    rows, wk, rb = plan.rows, plan.wk, plan.rows_per_block
    u_max, tk = (1 if rows >= 8 else 8 // rows), 32 * wk
    gx, gy = plan.grid(n)
    y, writes = np.full((m_rows, n), np.nan), np.zeros((m_rows, n), dtype=int)
    part = np.zeros((gy, m_rows, n), dtype=np.float32)
    counters = np.zeros(gx, dtype=int)
    for by in range(gy):
        c_lo = by * plan.chunks_per_split
        nc = min(plan.chunks_per_split, chunks - c_lo)
        assert nc > 0, "an empty split"
        xs, c_sum, x_sum = stage_x(xf, c_lo, nc)
        for bx in range(gx):
            red = np.zeros((8, rows, m_rows), dtype=np.float64)
            for warp in range(8):
                wr, kk = divmod(warp, wk)
                n0 = bx * rb + wr * rows
                for lane in range(32):
                    t = kk * 32 + lane
                    for c in [
                        c for cb in range(t, nc, u_max * tk) for c in range(cb, cb + u_max * tk, tk)
                    ]:
                        if c >= nc:
                            continue
                        g = (c_lo + c) // cpg
                        assert g < groups
                        for r in range(rows):
                            row = min(n0 + r, n - 1)
                            prod = f[row, c_lo + c][None, :] * xs[:, c]  # [M, 32]
                            dot = np.add.accumulate(prod, axis=-1, dtype=np.float32)[:, -1]
                            inner = (
                                np.float32(128) * (dot - c_sum[:, c]) - zeros[row, g] * x_sum[:, c]
                            )
                            red[warp, r] += np.float32(scales[row, g]) * inner
            for t in range(rb * m_rows):
                nn, m = bx * rb + t // m_rows, t % m_rows
                wr, r = divmod(t // m_rows, rows)
                if nn >= n:
                    continue
                v = sum(red[wr * wk + j, r, m] for j in range(wk))
                if gy == 1:
                    y[m, nn], writes[m, nn] = v, writes[m, nn] + 1
                else:
                    part[by, m, nn] = v
            if gy > 1:
                counters[bx] += 1
                if counters[bx] == gy:  # the last block of this tile: the ordered sum
                    lo, hi = bx * rb, min(n, bx * rb + rb)
                    y[:, lo:hi] = part[:, :, lo:hi].astype(np.float64).sum(0)
                    writes[:, lo:hi] += 1
                    counters[bx] = 0
    assert not counters.any()
    return y, writes


def test_magic_floats_are_one_plus_the_nibble_over_128_or_2048() -> None:
    w = random_weight(3, 64, 32, 0)
    q = ig.unpack_rows(w.qw).numpy().reshape(3, 2, 32)
    f = magic_floats(w.qw.numpy().view(np.uint32).reshape(3, 2, 4)).astype(np.float64)
    scale = np.where(np.arange(32) % 2 == 0, 1 / 128, 1 / 2048)
    np.testing.assert_array_equal(f, 1 + q * scale)


CASES = [  # (N, K, group_size, M, plan: None = the rule's, else (rows, wk, splits))
    (40, 320, 32, 1, None),
    (37, 576, 64, 3, None),
    (40, 320, 64, 2, (4, 4, 3)),
    (24, 1024, 128, 4, (4, 8, 2)),
    (16, 256, 256, 8, (2, 4, 2)),
    (20, 640, 128, 1, (8, 2, 4)),
    (9, 192, 32, 5, (2, 8, 1)),
]


@pytest.mark.parametrize(("n", "k", "group_size", "m", "variant"), CASES)
def test_emulated_kernel_computes_the_dequantized_matmul(n, k, group_size, m, variant) -> None:
    w = random_weight(n, k, group_size, seed=n + k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    plan = sk.choose(n, k, m) if variant is None else sk.split_plan(n, k, m, *variant)
    assert (plan.rows, plan.wk) in sk.VARIANTS[plan.m_t]
    y, writes = emulate(x, w, plan)
    assert (writes == 1).all(), "every output written exactly once"
    want = (x.double() @ ig.dequantize_ref(w, torch.float64).t()).numpy()
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_rule_on_llama_shapes() -> None:
    for name, (n, k) in SHAPES.items():
        for m in range(1, 9):
            plan = sk.choose(n, k, m)
            assert (plan.rows, plan.wk) in sk.VARIANTS[plan.m_t], (name, m)
            assert plan.m_t >= m and plan.fits(n, m), (name, m, plan)
            per_thread = -(-plan.chunks_per_split // (32 * plan.wk))
            assert per_thread * plan.rows <= sk.MAX_LOADS, (name, m, plan)
            assert plan.grid(n)[0] * plan.splits >= sk.SMS, (name, m, plan)
            assert (plan.splits - 1) * plan.chunks_per_split < k // 32  # no empty split
    # What the rule picks at batch 1 (the reasoning in cuda/int4_gemv.py's docstring):
    picks = {name: sk.choose(n, k, 1) for name, (n, k) in SHAPES.items()}
    assert picks["8b.gate_up"].name == "gemv_sk_m1_r8_w2" and picks["8b.gate_up"].splits == 1
    # Narrow: 128 blocks of 32 channels would leave SMs idle, so K splits across blocks.
    assert picks["8b.o"].name == "gemv_sk_m1_r8_w2" and picks["8b.o"].splits == 2
    assert picks["8b.down"].splits >= 2  # 14336 inputs in fp32 do not fit 48 KB
    assert picks["70b.down"].splits >= 3 and picks["70b.down"].shmem(1) <= sk.SMEM_MAX
    only = sk.choose(4096, 4096, 1, variants=((4, 4),))
    assert (only.rows, only.wk, only.splits) == (4, 4, 1)


def test_split_plan_has_no_empty_split_and_fits_shared_memory() -> None:
    for k in (32, 96, 4096, 14336, 28672):
        for m in (1, 3, 8):
            plan = sk.split_plan(4096, k, m, 2, 4)
            assert plan.shmem(m) <= sk.SMEM_MAX
            assert (
                (plan.splits - 1) * plan.chunks_per_split
                < k // 32
                <= (plan.splits * plan.chunks_per_split)
            )
    assert sk.split_plan(100, 4096, 1, 2, 4, splits=100).splits == 128 // 2  # 2 chunks each
    with pytest.raises(ValueError, match="x rows 9"):
        sk.m_template(9)
    big = sk.split_plan(10**6, 8192, 8, 2, 4)  # more partials than the workspace holds
    assert not big.fits(10**6, 8)


def test_forced_variant_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sk.forced_variant("") is None and sk.forced_variant("r8_w4") == (8, 4)
    with pytest.raises(ValueError, match="HEADRACE_INT4_GEMV_VARIANT 'r3_w4'"):
        sk.forced_variant("r3_w4")
    monkeypatch.setattr(sk, "_sms", lambda device: 132)
    monkeypatch.setattr(sk, "FORCED", (4, 4))
    w = random_weight(4096, 4096, 128, 0)
    plan = sk.plan_for(1, w, torch.device("cpu"))
    assert (plan.rows, plan.wk) == (4, 4)
    assert sk.plan_for(8, w, torch.device("cpu")) == sk.choose(4096, 4096, 8)  # M_T 8 lacks it
