"""A CPU emulation of cuda/int4_tiled_gemm.cu, lane by lane: the x chunks each thread stages
and PRMTs into the swizzled buffer, the weights each lane reads from its stage, the
scale-folded dequantization on the same bit patterns (magic numbers, zero-point constants,
bf16's hi/lo scale split), registers scattered into mma.m16n8k16's A / B / C fragments as the
PTX ISA defines them (tests/int4_mma_emulation.py's `mma`), the K splits and their
reduction in split order. A wrong input map, fragment order, swizzle or constant makes its
result differ from the dequantize-then-matmul reference."""

from __future__ import annotations

import numpy as np
import torch

from cuda import int4_tiled_gemm as tg
from cuda.int4_gemm import Int4Weight
from tests.int4_mma_emulation import MAGIC, ONE, SIXTEENTH, C, G, byte_perm, fma2, mma, zero_consts

NEG0 = 0x80008000


def slot(row: np.ndarray, ch: np.ndarray) -> np.ndarray:
    """tg_slot: the permuted buffer's 16-byte slot of (row, chunk ch = 4 c + i)."""
    c, i = ch >> 2, ch & 3
    return row * 16 + 4 * c + (i ^ ((c >> 1) | ((row & 1) << 1)))


def permuted_stage(xw: np.ndarray, m: int, m0: int, b: int, srows: int) -> np.ndarray:
    """What tg_stage + tg_permute leave in a permuted buffer for k-block b of the row block
    at m0: uint32 [1024 slots, 4], rows past M staged as row M - 1, slots not written NaN
    pairs; xw uint32 [M, K / 2] (x's 16-bit pairs)."""
    buf = np.full((tg.BM * 16, 4), 0xFFFFFFFF, dtype=np.uint32)
    q = np.arange(tg.THREADS * 4)  # every thread's 4 chunks: q = tid + 256 j
    row, ch = q >> 4, q & 15
    q, row, ch = q[row < srows], row[row < srows], ch[row < srows]
    src_row = np.minimum(m0 + row, m - 1)
    first = (b * tg.KB + 8 * ch) // 2
    v = xw[src_row[:, None], first[:, None] + np.arange(4)]  # the raw chunk (x, y, z, w)
    p = np.stack(
        [
            byte_perm(v[:, 0], v[:, 2], 0x5410),
            byte_perm(v[:, 0], v[:, 2], 0x7632),
            byte_perm(v[:, 1], v[:, 3], 0x5410),
            byte_perm(v[:, 1], v[:, 3], 0x7632),
        ],
        -1,
    )
    buf[slot(row, ch)] = p
    return buf


def sslot(row: np.ndarray, ch: np.ndarray) -> np.ndarray:
    """tg_sslot: the stream variant's x slot of (row, chunk ch), unpermuted."""
    return row * 16 + (ch ^ ((row & 1) << 2))


def raw_stage(xw: np.ndarray, m: int, m0: int, b: int, srows: int) -> np.ndarray:
    """What tg_stage<stream> leaves in an x slot for k-block b of the row block at m0:
    uint32 [1024 slots, 4], the raw chunks at `sslot`, slots not written NaN pairs."""
    buf = np.full((tg.BM * 16, 4), 0xFFFFFFFF, dtype=np.uint32)
    q = np.arange(tg.THREADS * 4)
    row, ch = q >> 4, q & 15
    row, ch = row[row < srows], ch[row < srows]
    first = (b * tg.KB + 8 * ch) // 2
    buf[sslot(row, ch)] = xw[np.minimum(m0 + row, m - 1)[:, None], first[:, None] + np.arange(4)]
    return buf


def chan_consts(s: np.ndarray, z: np.ndarray, dtype: torch.dtype) -> tuple:
    """tg_chan: (zlo, zhi, s_hi pair, s_lo pair) as uint32 bit patterns, per lane."""
    zlo, zhi = zero_consts(z, dtype)
    sf = torch.from_numpy(np.asarray(s, dtype=np.float16)).float()
    if dtype == torch.bfloat16:
        hi = sf.to(torch.bfloat16)
        lo = (sf - hi.float()).to(torch.bfloat16)
        hb = hi.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
        lb = lo.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    else:
        hb = sf.half().view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
        lb = np.zeros_like(hb)
    return zlo, zhi, hb | (hb << 16), lb | (lb << 16)


def dequant(
    w: np.ndarray, consts: tuple, dtype: torch.dtype, odd: tuple | None = None
) -> list[np.ndarray]:
    """tg_dequant2: q[s] = round((nibble s - z) scale, (nibble s + 4 - z) scale), uint32;
    odd s with `odd`'s constants where given (the stream layout's channel g + 8)."""
    magic, one = MAGIC[dtype], ONE[dtype]
    neg0 = np.full_like(w, NEG0)
    per_s = [consts, odd or consts, consts, odd or consts]

    def scale(qz: np.ndarray, k: tuple) -> np.ndarray:
        if dtype == torch.bfloat16:
            return fma2(qz, k[2], fma2(qz, k[3], neg0, dtype), dtype)
        return fma2(qz, k[2], neg0, dtype)

    if dtype == torch.bfloat16:
        return [
            scale(fma2(((w >> (4 * s)) & 0x000F000F) | magic, one, per_s[s][0], dtype), per_s[s])
            for s in range(4)
        ]
    w8 = w >> 8
    k0, k1, k2, k3 = per_s
    return [
        scale(fma2((w & 0x000F000F) | magic, one, k0[0], dtype), k0),
        scale(fma2((w & 0x00F000F0) | magic, SIXTEENTH, k1[1], dtype), k1),
        scale(fma2((w8 & 0x000F000F) | magic, one, k2[0], dtype), k2),
        scale(fma2((w8 & 0x00F000F0) | magic, SIXTEENTH, k3[1], dtype), k3),
    ]


def emulate(x: torch.Tensor, w: Int4Weight, splits: int | None = None) -> np.ndarray:
    """y [M, N] (float64, NaN where not written) as `tg.gemm` computes it on w's layout
    (rows or stream): the rule's splits or `splits`' (as gemm trims them), each split's
    partials summed in split order."""
    stream = w.layout == "stream"
    dtype, (m, k), n = x.dtype, x.shape, w.out_features
    kb = k // tg.KB
    s_count, per = tg.choose_splits(n, k, m)
    if splits is not None:
        per = -(-kb // splits)
        s_count = -(-kb // per)
    qw = w.qw.numpy().view(np.uint32)
    xw = x.contiguous().view(torch.int32).numpy().view(np.uint32)
    scales, zeros = w.scales.numpy(), w.zeros.numpy()
    gq = w.group_size // 32
    mb, nb = tg.grid_blocks(n, m)
    parts = np.zeros((s_count, m, n))
    written = np.zeros((m, n), dtype=bool)
    for bx in range(mb):
        m0 = bx * tg.BM
        used = -(-min(tg.BM, m - m0) // 8)
        for z in range(s_count):
            b0, b1 = z * per, min(kb, z * per + per)
            assert b1 > b0, "an empty split"
            stage = raw_stage if stream else permuted_stage
            bufs = {b: stage(xw, m, m0, b, 8 * used) for b in range(b0, b1)}
            for by in range(nb):
                n0 = by * tg.BN
                for warp in range(tg.THREADS // 32):
                    chn = [
                        np.minimum(n0 + 32 * warp + 16 * (e >> 1) + 8 * (e & 1) + G, n - 1)
                        for e in range(4)
                    ]
                    acc = np.zeros((2, 8, 32, 4))
                    for b in range(b0, b1):
                        if stream:
                            stream_kblock(acc, qw, bufs[b], b, n0, warp, chn, w, dtype, used)
                            continue
                        gi = (4 * b + C) // gq
                        words = 4 * (4 * b + C)[:, None] + np.arange(4)  # uint4 4 b + c
                        wv = [qw[chn[e][:, None], words] for e in range(4)]
                        consts = [
                            chan_consts(scales[chn[e], gi], zeros[chn[e], gi], dtype)
                            for e in range(4)
                        ]
                        sw = (C >> 1) | ((G & 1) << 1)
                        for i in range(4):
                            q = [dequant(wv[e][:, i], consts[e], dtype) for e in range(4)]
                            for nt in range(used):
                                xv = bufs[b][nt * 128 + G * 16 + 4 * C + (i ^ sw)]
                                for a in range(2):
                                    lo, hi = q[2 * a], q[2 * a + 1]
                                    mma(
                                        acc[a, nt],
                                        [lo[0], hi[0], lo[1], hi[1]],
                                        [xv[:, 0], xv[:, 1]],
                                        dtype,
                                    )
                                    mma(
                                        acc[a, nt],
                                        [lo[2], hi[2], lo[3], hi[3]],
                                        [xv[:, 2], xv[:, 3]],
                                        dtype,
                                    )
                    for a in range(2):
                        for nt in range(used):
                            for j in range(4):
                                rows = m0 + 8 * nt + 2 * C + (j & 1)
                                cols = n0 + 32 * warp + 16 * a + G + 8 * (j >> 1)
                                ok = (rows < m) & (cols < n)
                                assert not written[rows[ok], cols[ok]].any() or s_count > 1
                                parts[z, rows[ok], cols[ok]] = acc[a, nt][ok, j].astype(np.float32)
                                if z == 0:
                                    written[rows[ok], cols[ok]] = True
    y = np.zeros((m, n))
    for z in range(s_count):  # tiled_reduce's order (fp32 there; float64 here)
        y += parts[z]
    y[~written] = np.nan
    return y


def stream_kblock(
    acc: np.ndarray,
    qw: np.ndarray,
    buf: np.ndarray,
    b: int,
    n0: int,
    warp: int,
    chn: list[np.ndarray],
    w: Int4Weight,
    dtype: torch.dtype,
    used: int,
) -> None:
    """tg_kblock<NTU, stream>: lane L's vectors j of units (tile 2 warp + a, k-block b), A
    registers 1 and 3 with channel g + 8's constants, B straight from the staged x."""
    kb, n = w.in_features // tg.KB, w.out_features
    flat = qw.reshape(-1, 4)  # uint4 rows of the stream layout
    scales, zeros, gq = w.scales.numpy(), w.zeros.numpy(), w.group_size // 64
    for a in range(2):
        tile = min(n0 // 16 + 2 * warp + a, n // 16 - 1)
        unit = 64 * (tile * kb + b)
        consts = []
        for j in range(2):
            gi = (2 * b + j) // gq
            lo_c = chan_consts(scales[chn[2 * a], gi], zeros[chn[2 * a], gi], dtype)
            hi_c = chan_consts(scales[chn[2 * a + 1], gi], zeros[chn[2 * a + 1], gi], dtype)
            consts.append((lo_c, hi_c))
        for p in range(4):
            j = p >> 1
            vec = flat[unit + 32 * j + np.arange(32)]  # [lane, 4 words]
            q = [
                dequant(vec[:, 2 * (p & 1) + u], consts[j][0], dtype, consts[j][1])
                for u in range(2)
            ]
            for nt in range(used):
                xv = buf[nt * 128 + G * 16 + ((4 * p + C) ^ ((G & 1) << 2))]
                mma(acc[a, nt], q[0], [xv[:, 0], xv[:, 1]], dtype)
                mma(acc[a, nt], q[1], [xv[:, 2], xv[:, 3]], dtype)
