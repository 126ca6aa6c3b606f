"""A CPU emulation of cuda/int4_mma_gemv.cu, lane by lane: the same bit operations on the
same words (magic-number dequantization, PRMT pairing of x, the zero-point constants),
registers scattered into mma.m16n8k16's A / B / C fragments as the PTX ISA defines them,
the warps' K split and the block's sum. If the kernel's input mapping, fragment order or
constants were wrong, its result would not equal the dequantize-then-matmul reference."""

from __future__ import annotations

import numpy as np
import torch

from cuda import int4_mma_gemv as mg
from cuda.int4_gemm import Int4Weight

MAGIC = {torch.float16: 0x64006400, torch.bfloat16: 0x43004300}
ONE = {torch.float16: 0x3C003C00, torch.bfloat16: 0x3F803F80}
SIXTEENTH = 0x2C002C00  # fp16 1/16 pair


def halves(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """uint32 [...] -> float64 [..., 2] (low half first)."""
    flat = np.ascontiguousarray(bits, dtype=np.uint32).reshape(-1)
    if dtype == torch.float16:
        v = flat.view(np.float16).astype(np.float64)
    else:
        v = torch.from_numpy(flat.view(np.int32).copy()).view(torch.bfloat16).double().numpy()
    return v.reshape(*bits.shape, 2)


def to_bits(vals: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float64 [..., 2] -> uint32 [...], each value rounded to `dtype`."""
    t = torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float64)).to(dtype)
    return t.reshape(-1).view(torch.int32).numpy().view(np.uint32).reshape(vals.shape[:-1])


def fma2(a: np.ndarray, b: np.ndarray | int, c: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    b_arr = np.broadcast_to(np.asarray(b, dtype=np.uint32), a.shape)
    return to_bits(halves(a, dtype) * halves(b_arr, dtype) + halves(c, dtype), dtype)


def byte_perm(a: np.ndarray, b: np.ndarray, s: int) -> np.ndarray:
    src = np.stack(
        [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    )
    out = np.zeros_like(a)
    for i in range(4):
        out |= src[(s >> (4 * i)) & 7] << (8 * i)
    return out


def zero_consts(z: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """mw_zero's integer bit patterns (test_zero_constants_are_the_float_values checks them
    against -(magic + z) and -(magic / 16 + z) rounded to the dtype)."""
    zi = z.astype(np.uint32)
    if dtype == torch.bfloat16:
        return (0xC300C300 + zi * 0x00010001) & 0xFFFFFFFF, np.zeros_like(zi)
    return 0xE400E400 + zi * 0x00010001, 0xD400D400 + zi * 0x00100010


def dequant(w: np.ndarray, z: np.ndarray, dtype: torch.dtype) -> list[np.ndarray]:
    """mw_dequant: q[s] = (nibble s - z, nibble s + 4 - z), uint32 pairs."""
    zlo, zhi = zero_consts(z, dtype)
    magic, one = MAGIC[dtype], ONE[dtype]
    if dtype == torch.bfloat16:
        return [fma2(((w >> (4 * s)) & 0x000F000F) | magic, one, zlo, dtype) for s in range(4)]
    w8 = w >> 8
    return [
        fma2((w & 0x000F000F) | magic, one, zlo, dtype),
        fma2((w & 0x00F000F0) | magic, SIXTEENTH, zhi, dtype),
        fma2((w8 & 0x000F000F) | magic, one, zlo, dtype),
        fma2((w8 & 0x00F000F0) | magic, SIXTEENTH, zhi, dtype),
    ]


LANE = np.arange(32)
G, C = LANE // 4, LANE % 4


def mma(d: np.ndarray, a: list[np.ndarray], b: list[np.ndarray], dtype: torch.dtype) -> None:
    """d [32, 4] += A B with A, B scattered from the lanes' registers (PTX m16n8k16)."""
    am, bm = np.zeros((16, 16)), np.zeros((16, 8))
    for s, reg in enumerate(a):  # row g + 8 (s & 1), columns 2c + 8 (s >> 1) + {0, 1}
        h = halves(reg, dtype)
        for e in range(2):
            am[G + 8 * (s & 1), 2 * C + 8 * (s >> 1) + e] = h[:, e]
    for r, reg in enumerate(b):  # rows 2c + 8 r + {0, 1}, column g
        h = halves(reg, dtype)
        for e in range(2):
            bm[2 * C + 8 * r + e, G] = h[:, e]
    prod = am @ bm
    d[:, 0] += prod[G, 2 * C]
    d[:, 1] += prod[G, 2 * C + 1]
    d[:, 2] += prod[G + 8, 2 * C]
    d[:, 3] += prod[G + 8, 2 * C + 1]


def kblock(t: np.ndarray, wl: np.ndarray, wh: np.ndarray, zl, zh, xv, dtype) -> None:
    """mw_kblock: wl / wh uint32 [32, 4] (the lanes' vectors), xv uint32 [32, 4, 4]."""
    for i in range(4):
        v = xv[:, i]
        b00, b01 = byte_perm(v[:, 0], v[:, 2], 0x5410), byte_perm(v[:, 0], v[:, 2], 0x7632)
        b10, b11 = byte_perm(v[:, 1], v[:, 3], 0x5410), byte_perm(v[:, 1], v[:, 3], 0x7632)
        ql, qh = dequant(wl[:, i], zl, dtype), dequant(wh[:, i], zh, dtype)
        mma(t, [ql[0], qh[0], ql[1], qh[1]], [b00, b01], dtype)
        mma(t, [ql[2], qh[2], ql[3], qh[3]], [b10, b11], dtype)


def emulate(x: torch.Tensor, w: Int4Weight, wk: int) -> np.ndarray:
    """y [M, N] (float64) as mma_gemv_w{wk}_* computes it (U only orders the loads)."""
    dtype, (m, k), n = x.dtype, x.shape, w.out_features
    qw = w.qw.numpy().view(np.uint32)
    xw = x.contiguous().view(torch.int32).numpy().view(np.uint32)  # [M, K / 2]
    scales, zeros = w.scales.double().numpy(), w.zeros.double().numpy()
    kb, bpg = k // mg.KB, w.group_size // mg.KB
    per = -(-kb // wk)
    y = np.full((m, n), np.nan)
    for tile in range(-(-n // 16)):
        ch = tile * 16 + G
        nl, nh = np.minimum(ch, n - 1), np.minimum(ch + 8, n - 1)
        xrow = np.where(m > G, G, 0)
        total = np.zeros((32, 4))
        for warp in range(wk):
            acc = np.zeros((32, 4))
            for b in range(warp * per, min(kb, warp * per + per)):
                gi = b // bpg
                words = 4 * (4 * b + C)[:, None] + np.arange(4)  # uint4 4b + c of the row
                xidx = 4 * (16 * b + 4 * C[:, None, None] + np.arange(4)[None, :, None])
                xv = xw[xrow[:, None, None], xidx + np.arange(4)]
                t = np.zeros((32, 4))
                kblock(
                    t,
                    qw[nl[:, None], words],
                    qw[nh[:, None], words],
                    zeros[nl, gi],
                    zeros[nh, gi],
                    xv,
                    dtype,
                )
                acc += t * np.stack([scales[nl, gi]] * 2 + [scales[nh, gi]] * 2, -1)
            total += acc
        for j in range(4):
            rows, cols = 2 * C + (j & 1), ch + 8 * (j >= 2)
            ok = (rows < m) & (cols < n)
            y[rows[ok], cols[ok]] = total[ok, j]
    return y


def swizzle(row: np.ndarray, c: np.ndarray) -> np.ndarray:
    """mma_skinny's shared-memory swizzle: 16-byte chunk j of row's run c sits at j ^ this."""
    return (c >> 1) | ((row & 1) << 1)


def stage(xw: np.ndarray, m: int, b: int, rows: int) -> np.ndarray:
    """ms_stage for one slice's k-block b: the buffer, uint32 [rows * 16 slots, 4], rows
    past m staged as row m - 1; xw uint32 [m, K / 2] (x's bf16/fp16 pairs)."""
    row = np.arange(rows)[:, None, None]
    c, j = np.arange(4)[None, :, None], np.arange(4)[None, None, :]
    slot = row * 16 + 4 * c + (j ^ swizzle(row, c))
    first = (b * mg.KB + 32 * c + 8 * j) // 2  # the chunk's first uint32 of the row
    src = xw[np.minimum(row, m - 1)[..., None], first[..., None] + np.arange(4)]
    buf = np.full((rows * 16, 4), 0xFFFFFFFF, dtype=np.uint32)  # NaN pairs: caught if read
    buf[slot.reshape(-1)] = src.reshape(-1, 4)
    return buf


def emulate_skinny_launch(
    x: torch.Tensor, w: Int4Weight, variant: tuple[int, int, int]
) -> np.ndarray:
    """y [M, N] (float64, NaN where not written) as one mma_skinny_t{TW}_w{WK}_n{NT} launch
    on x (M <= 8 NT rows) computes it: the staged, swizzled x read back by each lane, NT
    8-row tiles of B against one dequantized A, the slices' sum."""
    tw, wk, nt = variant
    dtype, (m, k), n = x.dtype, x.shape, w.out_features
    assert m <= 8 * nt
    qw = w.qw.numpy().view(np.uint32)
    xw = x.contiguous().view(torch.int32).numpy().view(np.uint32)
    scales, zeros = w.scales.double().numpy(), w.zeros.double().numpy()
    kb, bpg = k // mg.KB, w.group_size // mg.KB
    per = -(-kb // wk)
    used = min(nt, -(-m // 8))
    bufs = [stage(xw, m, b, 8 * used) for b in range(kb)]  # the same for every block
    sw = swizzle(G, C)
    y = np.full((m, n), np.nan)
    for tile in range(-(-n // (mg.TILE_N * tw)) * tw):
        ch = tile * 16 + G
        nl, nh = np.minimum(ch, n - 1), np.minimum(ch + 8, n - 1)
        total = np.zeros((nt, 32, 4))
        for ks in range(wk):
            for b in range(ks * per, min(kb, ks * per + per)):
                gi = b // bpg
                words = 4 * (4 * b + C)[:, None] + np.arange(4)
                scale = np.stack([scales[nl, gi]] * 2 + [scales[nh, gi]] * 2, -1)
                for i_nt in range(used):
                    slots = i_nt * 128 + G * 16 + 4 * C
                    xv = bufs[b][slots[:, None] + (np.arange(4)[None, :] ^ sw[:, None])]
                    t = np.zeros((32, 4))
                    kblock(
                        t,
                        qw[nl[:, None], words],
                        qw[nh[:, None], words],
                        zeros[nl, gi],
                        zeros[nh, gi],
                        xv,
                        dtype,
                    )
                    total[i_nt] += t * scale
        for i_nt in range(used):
            for j in range(4):
                rows, cols = 8 * i_nt + 2 * C + (j & 1), ch + 8 * (j >= 2)
                ok = (rows < m) & (cols < n)
                y[rows[ok], cols[ok]] = total[i_nt][ok, j]
    return y


def emulate_skinny(
    x: torch.Tensor, w: Int4Weight, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """y [M, N] as `mg.skinny` computes it: its launches (`skinny_chunks`), each with the
    rule's (TW, WK) or `shape`'s."""
    y = np.full((x.shape[0], w.out_features), np.nan)
    for r, rows, nt in mg.skinny_chunks(x.shape[0]):
        tw, wk = shape or mg.skinny_choose(w.out_features, w.in_features, nt)[:2]
        y[r : r + rows] = emulate_skinny_launch(x[r : r + rows], w, (tw, wk, nt))
    return y
