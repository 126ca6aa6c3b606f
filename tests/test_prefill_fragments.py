"""The prefill kernel's shared-memory layout and tensor-core fragment addressing, emulated on
CPU: cp.async destinations (swizzled tiles), the lanes' ldmatrix addresses (the XOR form of
the swizzle), the m16n8k16 fragment layouts, and P reused as the A operand of P @ V.

Each address expression below is the one in cuda/prefill_attention_v2.cu (round 2,
prefill_v2_impl, and cuda/prefill_mma.cuh's swz), transcribed; the emulated warp's
S = Q K^T and O = P V over a whole BN-key tile of the ring must equal numpy's (the SUB-key
steps' offsets into it: tests/test_prefill_v2_emulation.py). A wrong lane, chunk or matrix
order shows up as a mismatch here, not as a wrong answer on the GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from cuda import prefill_v2 as v2

# (BM, BN, WARPS) of round 2's configurations: what the addressing depends on.
SHAPES = sorted({(c.block_m, c.block_n, c.warps) for c in v2.CONFIGS})
SHAPE_IDS = [f"m{m}n{n}w{w}" for m, n, w in SHAPES]


def swz(row: int, chunk: int, d: int) -> int:
    """Byte offset of chunk `chunk` of row `row` (pf::swz)."""
    return (row * (d // 8) + (chunk ^ (row & 7))) * 16


class Smem:
    """Shared memory as bytes; tiles are stored as 16-bit elements (here float16 bits)."""

    def __init__(self, nbytes: int) -> None:
        self.mem = np.zeros(nbytes // 2, dtype=np.float32)  # one slot per 16-bit element

    def store_tile(self, base: int, tile: np.ndarray) -> None:
        """What the cp.async loops write: row `row`, chunk `c` at base + swz(row, c)."""
        rows, d = tile.shape
        for row in range(rows):
            for c in range(d // 8):
                off = (base + swz(row, c, d)) // 2
                self.mem[off : off + 8] = tile[row, c * 8 : c * 8 + 8]

    def row8(self, addr: int) -> np.ndarray:
        assert addr % 16 == 0, "ldmatrix rows are 16-byte aligned"
        return self.mem[addr // 2 : addr // 2 + 8]

    def ldmatrix_x4(self, addrs: list[int], trans: bool = False) -> np.ndarray:
        """regs[lane, j, 2]: matrix j's rows come from lanes 8j..8j+7; lane t holds row
        t / 4, elements 2 (t % 4) + {0, 1} (trans: those rows, column t / 4)."""
        regs = np.zeros((32, 4, 2), dtype=np.float32)
        for j in range(4):
            m = np.stack([self.row8(addrs[8 * j + i]) for i in range(8)])  # [8 rows, 8]
            if trans:
                m = m.T
            for t in range(32):
                regs[t, j] = m[t // 4, 2 * (t % 4) : 2 * (t % 4) + 2]
        return regs


def a_matrix(a: np.ndarray) -> np.ndarray:
    """The 16x16 A operand from lanes' a[4][2] (a0: row g, a1: row g+8, a2/a3: cols + 8)."""
    out = np.zeros((16, 16), dtype=np.float32)
    for t in range(32):
        g, c = t // 4, 2 * (t % 4)
        out[g, c : c + 2] = a[t, 0]
        out[g + 8, c : c + 2] = a[t, 1]
        out[g, c + 8 : c + 10] = a[t, 2]
        out[g + 8, c + 8 : c + 10] = a[t, 3]
    return out


def b_matrix(b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """The 16x8 B operand (col-major): b0 holds k = 2 (t % 4) + {0, 1}, b1 those + 8; n = t / 4."""
    out = np.zeros((16, 8), dtype=np.float32)
    for t in range(32):
        k, n = 2 * (t % 4), t // 4
        out[k : k + 2, n] = b0[t]
        out[k + 8 : k + 10, n] = b1[t]
    return out


def mma(c: np.ndarray, a: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> None:
    """c[lane, 4] += A B in the C layout: c0,c1 row g cols 2 (t % 4) + {0,1}; c2,c3 row g + 8."""
    prod = a_matrix(a) @ b_matrix(b0, b1)
    for t in range(32):
        g, col = t // 4, 2 * (t % 4)
        c[t, 0:2] += prod[g, col : col + 2]
        c[t, 2:4] += prod[g + 8, col : col + 2]


def c_to_matrix(c: np.ndarray) -> np.ndarray:
    """[16, 8] from the lanes' C fragments."""
    out = np.zeros((16, 8), dtype=np.float32)
    for t in range(32):
        g, col = t // 4, 2 * (t % 4)
        out[g, col : col + 2] = c[t, 0:2]
        out[g + 8, col : col + 2] = c[t, 2:4]
    return out


def emulate_warp(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, warp: int, mt_count: int, stage: int
) -> tuple[np.ndarray, np.ndarray]:
    """One warp's S = Q K^T (its mt_count x 16 rows) and O = P V with P = S, addressed the way
    the kernel addresses shared memory. q: [BM, D]; k, v: [BN, D]."""
    bm, d = q.shape
    bn = k.shape[0]
    q_bytes, kv_bytes, stages = bm * d * 2, bn * d * 2, 2
    s_q, s_k = 1024, 1024 + q_bytes  # a 1024-aligned base, as after the kernel's pad
    s_v = s_k + stages * kv_bytes
    smem = Smem(s_v + stages * kv_bytes)
    smem.store_tile(s_q, q)
    smem.store_tile(s_k + stage * kv_bytes, k)
    smem.store_tile(s_v + stage * kv_bytes, v)
    lanes = range(32)
    s = np.zeros((mt_count, bn // 8, 32, 4), dtype=np.float32)
    kaddr = [
        s_k + stage * kv_bytes + swz((ln & 7) + ((ln >> 4) << 3), (ln >> 3) & 1, d) for ln in lanes
    ]
    qaddr = [s_q + swz(warp * mt_count * 16 + (ln & 15), ln >> 4, d) for ln in lanes]
    for kk in range(d // 16):
        a = [
            smem.ldmatrix_x4([(qa ^ (kk << 5)) + mt * 16 * d * 2 for qa in qaddr])
            for mt in range(mt_count)
        ]
        if mt_count == 1:  # the QREG path loads Q with the plain swizzle once
            rows = [warp * 16 + (ln & 15) for ln in lanes]
            direct = smem.ldmatrix_x4(
                [s_q + swz(rw, (kk * 2) | (ln >> 4), d) for rw, ln in zip(rows, lanes, strict=True)]
            )
            np.testing.assert_array_equal(direct, a[0])
        for p in range(bn // 16):
            b = smem.ldmatrix_x4([(ka ^ (kk << 5)) + p * 16 * d * 2 for ka in kaddr])
            for mt in range(mt_count):
                mma(s[mt, 2 * p], a[mt], b[:, 0], b[:, 1])
                mma(s[mt, 2 * p + 1], a[mt], b[:, 2], b[:, 3])
    # P's C fragments repacked as A fragments of the P V k-steps.
    o = np.zeros((mt_count, d // 8, 32, 4), dtype=np.float32)
    vaddr = [
        s_v + stage * kv_bytes + swz((ln & 7) + (((ln >> 3) & 1) << 3), ln >> 4, d) for ln in lanes
    ]
    for dp in range(d // 16):
        for kk in range(bn // 16):
            b = smem.ldmatrix_x4([(va ^ (dp << 5)) + kk * 16 * d * 2 for va in vaddr], trans=True)
            for mt in range(mt_count):
                pk = np.stack(
                    [
                        s[mt, 2 * kk, :, 0:2],
                        s[mt, 2 * kk, :, 2:4],
                        s[mt, 2 * kk + 1, :, 0:2],
                        s[mt, 2 * kk + 1, :, 2:4],
                    ],
                    axis=1,
                )
                mma(o[mt, 2 * dp], pk, b[:, 0], b[:, 1])
                mma(o[mt, 2 * dp + 1], pk, b[:, 2], b[:, 3])
    s_full = np.concatenate(
        [
            np.concatenate([c_to_matrix(s[mt, nt]) for nt in range(bn // 8)], 1)
            for mt in range(mt_count)
        ]
    )
    o_full = np.concatenate(
        [
            np.concatenate([c_to_matrix(o[mt, dt]) for dt in range(d // 8)], 1)
            for mt in range(mt_count)
        ]
    )
    return s_full, o_full


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize(("bm", "bn", "warps"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("d", [64, 128])
def test_fragments_compute_q_kt_and_p_v(d: int, bm: int, bn: int, warps: int, stage: int) -> None:
    rng = np.random.default_rng(d + bm + warps + stage)
    # small integers: every product and sum is exact in float32
    q = rng.integers(-3, 4, (bm, d)).astype(np.float32)
    k = rng.integers(-3, 4, (bn, d)).astype(np.float32)
    v = rng.integers(-3, 4, (bn, d)).astype(np.float32)
    mt_count = bm // (16 * warps)
    for warp in sorted({0, warps - 1}):
        s, o = emulate_warp(q, k, v, warp, mt_count, stage)
        rows = slice(warp * mt_count * 16, (warp + 1) * mt_count * 16)
        np.testing.assert_array_equal(s, q[rows] @ k.T)
        np.testing.assert_array_equal(o, s @ v)


def test_swizzle_spreads_ldmatrix_rows_over_bank_groups() -> None:
    # The 8 rows of one ldmatrix phase (same logical chunk) land in 8 different 16-byte
    # bank groups (bytes mod 128), for every chunk and both head dims.
    for d in (64, 128):
        for chunk in range(d // 8):
            for first in range(0, 64, 8):
                groups = {swz(first + i, chunk, d) % 128 // 16 for i in range(8)}
                assert len(groups) == 8, (d, chunk, first)


def test_xor_addressing_equals_the_swizzle() -> None:
    # kaddr ^ (kk << 5) is swz(key, 2 kk + hi) for every lane, k-step and tile row offset.
    for d in (64, 128):
        for ln in range(32):
            key0, hi = (ln & 7) + ((ln >> 4) << 3), (ln >> 3) & 1
            for kk in range(d // 16):
                for p in range(4):
                    got = (1024 + swz(key0, hi, d)) ^ (kk << 5)
                    want = 1024 + swz(key0 + 16 * p, kk * 2 + hi, d)
                    assert got + p * 16 * d * 2 == want


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(("bm", "bn", "warps"), SHAPES, ids=SHAPE_IDS)
def test_copies_cover_every_chunk_of_the_tiles_once(d: int, bm: int, bn: int, warps: int) -> None:
    # Thread tid copies chunk tid % CPR of rows tid / CPR + it * ROW_STEP (the Q loop), and
    # chunk tid % RCPR of rows tid / RCPR + it * RAW_ROW_STEP (load_tile: RCPR = CPR for a
    # 16-bit cache, CPR / 2 for FP8's one-byte elements).
    threads = warps * 32
    for rows, cpr in ((bm, d // 8), (bn, d // 8), (bn, d // 16)):
        row_step = threads // cpr
        iters = rows * cpr // threads
        got = [
            (tid // cpr + it * row_step, tid % cpr) for tid in range(threads) for it in range(iters)
        ]
        assert sorted(got) == [(r, c) for r in range(rows) for c in range(cpr)]
    assert threads >= bn  # page ids: thread `row` reads row `row`'s
