"""A CPU emulation of cuda/int4_v4_gemv.cu, lane by lane: the words each lane copies out of
the stream layout (unit 64 (t KB + b), vector j at 32 j + lane), the same bit operations
(magic-number dequantization with the zero of channel g for even A registers and g + 8 for
odd ones, B registers straight from one 16-byte x load), the fragments scattered as the
PTX ISA defines mma.m16n8k16's, one scale per half k-block, the warps' K split and the
block's sum. A wrong nibble map, fragment order or constant would not equal the
dequantize-then-matmul reference."""

from __future__ import annotations

import numpy as np
import torch

from cuda import int4_v4_gemv as v4
from cuda.int4_gemm import Int4Weight
from tests.int4_mma_emulation import MAGIC, ONE, SIXTEENTH, fma2, mma, zero_consts

LANE = np.arange(32)
G, C = LANE // 4, LANE % 4


def dequant(w: np.ndarray, zg: np.ndarray, zh: np.ndarray, dtype: torch.dtype) -> list[np.ndarray]:
    """v4_dequant: A register s = (nibble s, nibble s + 4) - zero of channel g + 8 (s & 1)."""
    glo, hlo, hhi = zero_consts(zg, dtype)[0], *zero_consts(zh, dtype)  # fp16: g + 8 odd only
    magic, one, lo = MAGIC[dtype], ONE[dtype], 0x000F000F
    if dtype == torch.bfloat16:
        w4 = w >> 4
        return [
            fma2((w & lo) | magic, one, glo, dtype),
            fma2((w4 & lo) | magic, one, hlo, dtype),
            fma2(((w >> 8) & lo) | magic, one, glo, dtype),
            fma2(((w4 >> 8) & lo) | magic, one, hlo, dtype),
        ]
    w8, hi = w >> 8, lo << 4
    return [
        fma2((w & lo) | magic, one, glo, dtype),
        fma2((w & hi) | magic, SIXTEENTH, hhi, dtype),
        fma2((w8 & lo) | magic, one, glo, dtype),
        fma2((w8 & hi) | magic, SIXTEENTH, hhi, dtype),
    ]


def half(t, wv, xa, xb, zg, zh, dtype) -> None:  # type: ignore[no-untyped-def]
    """v4_half: wv uint32 [32, 4] (the lanes' vector), xa / xb uint32 [32, 4]."""
    for i in range(4):
        xv = xa if i < 2 else xb
        a = dequant(wv[:, i], zg, zh, dtype)
        b = [xv[:, 0], xv[:, 1]] if i % 2 == 0 else [xv[:, 2], xv[:, 3]]
        mma(t, a, b, dtype)


def emulate(x: torch.Tensor, w: Int4Weight, wk: int) -> np.ndarray:
    """y [M, N] (float64) as v4_gemv_w{wk}_* computes it (S only orders the copies);
    w in the stream layout."""
    dtype, (m, k), n = x.dtype, x.shape, w.out_features
    qs = w.qw.numpy().view(np.uint32).reshape(-1, 4)  # uint4 rows of the stream
    xw = x.contiguous().view(torch.int32).numpy().view(np.uint32).reshape(m, -1, 4)  # uint4s
    scales, zeros = w.scales.double().numpy(), w.zeros.numpy()
    shift = v4.group_shift(w.group_size)
    kb = k // v4.KB
    per = -(-kb // wk)
    xrow = np.where(m > G, G, 0)
    y = np.full((m, n), np.nan)
    for tile in range(n // 16):
        ch = tile * 16 + G
        total = np.zeros((32, 4))
        for warp in range(wk):
            acc = np.zeros((32, 4))
            for b in range(min(kb, warp * per), min(kb, warp * per + per)):
                unit = 64 * (tile * kb + b)
                w0, w1 = qs[unit + LANE], qs[unit + 32 + LANE]
                xs = [xw[xrow, 16 * b + 4 * p + C] for p in range(4)]
                g0, g1 = (128 * b) >> shift, (128 * b + 64) >> shift
                t0, t1 = np.zeros((32, 4)), np.zeros((32, 4))
                half(t0, w0, xs[0], xs[1], zeros[ch, g0], zeros[ch + 8, g0], dtype)
                half(t1, w1, xs[2], xs[3], zeros[ch, g1], zeros[ch + 8, g1], dtype)
                s0 = np.stack([scales[ch, g0]] * 2 + [scales[ch + 8, g0]] * 2, -1)
                s1 = np.stack([scales[ch, g1]] * 2 + [scales[ch + 8, g1]] * 2, -1)
                acc += s0 * t0 + s1 * t1
            total += acc
        for j in range(4):
            rows, cols = 2 * C + (j & 1), ch + 8 * (j >= 2)
            ok = rows < m
            y[rows[ok], cols[ok]] = total[ok, j]
    return y


def dequant_rows(w: Int4Weight) -> np.ndarray:
    """v4_dequant_rows' index math, every thread at once: W [N, K] (float64)."""
    n, k = w.out_features, w.in_features
    qv = w.qw.numpy().view(np.uint32).reshape(-1)
    ch, k0 = np.meshgrid(np.arange(n), np.arange(0, k, 8), indexing="ij")
    shift = v4.group_shift(w.group_size)
    s = w.scales.double().numpy()[ch, k0 >> shift]
    z = w.zeros.numpy().astype(np.float64)[ch, k0 >> shift]
    r = ch % 16
    g, hi = r & 7, r >> 3
    kk = k0 % v4.KB
    p, c = kk // 32, (kk % 32) // 8
    unit = (ch // 16) * (k // v4.KB) + k0 // v4.KB
    out = np.zeros((n, k // 8, 8))
    for e in range(2):
        ks = 2 * p + e
        word = qv[(unit * 64 + 32 * (ks // 4) + 4 * g + c) * 4 + ks % 4]
        for o in range(4):
            nib = hi + 2 * (o >> 1) + 4 * (o & 1)
            out[:, :, 4 * e + o] = (((word >> (4 * nib)) & 0xF) - z) * s
    return out.reshape(n, k)


def stage_swizzle(row: np.ndarray) -> np.ndarray:
    """v4_skinny's shared-memory swizzle: chunk e of a staged row sits at e ^ this."""
    return (row & 1) << 2


def stage(xw: np.ndarray, m: int, b: int, rows: int) -> np.ndarray:
    """vs_stage for one slice's k-block b: uint32 [rows * 16 slots, 4]; rows past m staged as
    row m - 1; xw uint32 [m, K / 8, 4] (x's uint4s)."""
    row = np.arange(rows)[:, None]
    e = np.arange(16)[None, :]
    buf = np.full((rows * 16, 4), 0xFFFFFFFF, dtype=np.uint32)  # NaN pairs: caught if read
    buf[(row * 16 + (e ^ stage_swizzle(row))).reshape(-1)] = xw[
        np.minimum(row, m - 1), 16 * b + e
    ].reshape(-1, 4)
    return buf


def emulate_skinny_launch(
    x: torch.Tensor, w: Int4Weight, variant: tuple[int, int, int]
) -> np.ndarray:
    """y [M, N] (float64, NaN where not written) as one v4_skinny_t{TW}_w{WK}_n{NT} launch
    computes it: x staged and swizzled, read back by each lane, NT 8-row tiles against one
    dequantized A, one scale a half k-block, the slices' sum; w in the stream layout."""
    tw, wk, nt = variant
    dtype, (m, k), n = x.dtype, x.shape, w.out_features
    assert m <= 8 * nt
    qs = w.qw.numpy().view(np.uint32).reshape(-1, 4)
    xw = x.contiguous().view(torch.int32).numpy().view(np.uint32).reshape(m, -1, 4)
    scales, zeros = w.scales.double().numpy(), w.zeros.numpy()
    shift = v4.group_shift(w.group_size)
    kb, tiles = k // v4.KB, n // 16
    per = -(-kb // wk)
    used = min(nt, -(-m // 8))
    bufs = [stage(xw, m, b, 8 * used) for b in range(kb)]
    swz = stage_swizzle(G)
    y = np.full((m, n), np.nan)
    for tile_raw in range(-(-tiles // tw) * tw):
        tile = min(tile_raw, tiles - 1)
        ch = tile * 16 + G
        total = np.zeros((nt, 32, 4))
        for ks in range(wk):
            for b in range(ks * per, min(kb, ks * per + per)):
                unit = 64 * (tile * kb + b)
                wv = [qs[unit + LANE], qs[unit + 32 + LANE]]
                for j in range(2):
                    gi = (128 * b + 64 * j) >> shift
                    scale = np.stack([scales[ch, gi]] * 2 + [scales[ch + 8, gi]] * 2, -1)
                    for i_nt in range(used):
                        row = (i_nt * 8 + G) * 16
                        xa = bufs[b][row + ((4 * (2 * j) + C) ^ swz)]
                        xb = bufs[b][row + ((4 * (2 * j + 1) + C) ^ swz)]
                        t = np.zeros((32, 4))
                        half(t, wv[j], xa, xb, zeros[ch, gi], zeros[ch + 8, gi], dtype)
                        total[i_nt] += t * scale
        if tile_raw >= tiles:
            continue
        for i_nt in range(used):
            for jj in range(4):
                rows, cols = 8 * i_nt + 2 * C + (jj & 1), ch + 8 * (jj >= 2)
                ok = rows < m
                y[rows[ok], cols[ok]] = total[i_nt][ok, jj]
    return y


def emulate_skinny(
    x: torch.Tensor, w: Int4Weight, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """y [M, N] as `v4.skinny` computes it: round 3's launches (mg.skinny_chunks)."""
    from cuda import int4_mma_gemv as mg

    y = np.full((x.shape[0], w.out_features), np.nan)
    for r, rows, nt in mg.skinny_chunks(x.shape[0]):
        tw, wk = shape or mg.skinny_choose(w.out_features, w.in_features, nt)[:2]
        y[r : r + rows] = emulate_skinny_launch(x[r : r + rows], w, (tw, wk, nt))
    return y
