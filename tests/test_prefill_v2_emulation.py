"""The prefill kernel's inner loop (round 2, cuda/prefill_attention_v2.cu), emulated on CPU:

- the online softmax over SUB-key steps with the lazy rescale (a warp's vote; a row's max
  moves only when a step's max passes it by more than RESCALE_LOG2), the warp-level skip of
  steps past the warp's last visible key, per-step masking, and the FP8 scales (k_scale in
  scale_log2, v_scale on the output): equal to the reference, with P <= 2^RESCALE_LOG2;
- the ldmatrix addresses of a sub-step (row offset u * SUB after the XOR) and the Q
  fragments kept in registers at 32 rows per warp (head_dim 64);
- the FP8 tiles: cp.async destinations of the raw ring, the widening into the swizzled
  16-bit tile, and the exactness of e4m3 -> half -> float -> bf16.

Index math is transcribed from the kernel, as in tests/test_prefill_attention.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cuda import prefill_attention as pa
from cuda import prefill_v2 as v2
from cuda.paged_attention import AttentionParams
from tests.test_prefill_attention import Block, block_schedule, random_shapes, visible
from tests.test_prefill_fragments import Smem, c_to_matrix, mma, swz
from tests.test_prefill_v2 import RESCALE_LOG2


def warp_steps(b: Block, c: v2.V2Config, warp: int, group: int, ctx: int) -> list[int]:
    """First keys n0 of the SUB-key steps one warp runs (prefill_v2_impl's loops)."""
    mt = c.block_m // (16 * c.warps)
    last_row = b.m0 + warp * mt * 16 + mt * 16 - 1
    warp_kv_hi = min(b.kv_hi, last_row // group + ctx + 1) if last_row >= 0 else 0
    steps = []
    for n in range(b.n_begin, b.n_end):
        for u in range(c.block_n // c.sub):
            n0 = n * c.block_n + u * c.sub
            if n0 >= warp_kv_hi:
                break
            steps.append(n0)
    return steps


def emulate_block(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    b: Block,
    shape: tuple[int, int, int, int],
    c: v2.V2Config,
    scale_log2: float,
    v_scale: float,
) -> tuple[np.ndarray, float]:
    """One block in float64, warp by warp: (its rows' output, the largest P it formed)."""
    q_len, seq_len, group, window = shape
    ctx = seq_len - q_len
    bm, d, mt = c.block_m, q.shape[1], c.block_m // (16 * c.warps)
    lo = max(b.m0, 0)
    qt = np.zeros((bm, d))
    qt[lo - b.m0 :] = q[lo : b.m_end]
    limit = np.array([m // group + ctx if m >= 0 else -1 for m in range(b.m0, b.m_end)])
    unmasked_below = min(seq_len, lo // group + ctx + 1)
    masked_below = (b.m_end - 1) // group + ctx - window + 1 if window > 0 else 0
    out, p_max = np.zeros((bm, d)), 0.0
    for warp in range(c.warps):
        rows = slice(warp * mt * 16, (warp + 1) * mt * 16)
        m_run, l_run = np.full(mt * 16, -np.inf), np.zeros(mt * 16)
        o = np.zeros((mt * 16, d))
        for n0 in warp_steps(b, c, warp, group, ctx):
            j = np.arange(n0, n0 + c.sub)
            kt = np.where((j < b.kv_hi)[:, None], k[np.minimum(j, seq_len - 1)], 0.0)
            vt = np.where((j < b.kv_hi)[:, None], v[np.minimum(j, seq_len - 1)], 0.0)
            s = qt[rows] @ kt.T
            if n0 + c.sub > unmasked_below or n0 < masked_below:
                lim = limit[rows]
                lower = lim - window if window > 0 else np.full(mt * 16, -1)
                s[(j[None, :] > lim[:, None]) | (j[None, :] <= lower[:, None])] = -np.inf
            mx = s.max(1) * scale_log2
            if (mx > m_run + RESCALE_LOG2).any():  # the warp's vote
                m_new = np.maximum(m_run, mx)
                with np.errstate(invalid="ignore"):
                    corr = np.where(m_new == -np.inf, 1.0, np.exp2(m_run - m_new))
                m_run, l_run, o = m_new, l_run * corr, o * corr[:, None]
            base = np.where(m_run == -np.inf, 0.0, m_run)
            p = np.exp2(s * scale_log2 - base[:, None])
            p_max = max(p_max, p.max())
            l_run = l_run + p.sum(1)
            o = o + p @ vt
        inv = np.where(l_run > 0, v_scale / np.where(l_run > 0, l_run, 1), 0.0)
        out[rows] = o * inv[:, None]
    return out[lo - b.m0 :], p_max


def attend(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, shape: tuple[int, int, int, int]
) -> np.ndarray:
    scale = q.shape[1] ** -0.5
    s = (q @ k.T) * scale
    s[~visible(*shape)] = -np.inf
    p = np.exp(s - s.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)) @ v


def run_blocks(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    shape: tuple[int, int, int, int],
    c: v2.V2Config,
    params: AttentionParams,
) -> tuple[np.ndarray, float]:
    """Every row tile of one request, with the scales kernel_args passes for an FP8 cache."""
    q_len, seq_len, group, window = shape
    scale_log2 = params.scale * pa.LOG2E * params.k_scale
    got, p_max = np.zeros((q_len * group, q.shape[1])), 0.0
    for z in range(math.ceil(q_len * group / c.block_m)):
        b = block_schedule(z, q_len, seq_len, group, c.block_m, c.block_n, window)
        assert b is not None
        rows, pm = emulate_block(q, k, v, b, shape, c, scale_log2, params.v_scale)
        got[max(b.m0, 0) : b.m_end] = rows
        p_max = max(p_max, pm)
    return got, p_max


@pytest.mark.parametrize("config", v2.CONFIGS, ids=lambda c: c.name)
def test_emulated_lazy_softmax_equals_the_reference(config: v2.V2Config) -> None:
    rng = np.random.default_rng(config.block_n + config.sub + config.warps)
    d = 16
    for shape in random_shapes(10, config.sub):
        q_len, seq_len, group, _ = shape
        q = rng.standard_normal((q_len * group, d)) * 3
        # keys that grow along the sequence: the running max rises again and again
        growth = np.linspace(0.2, rng.choice([1.0, 6.0]), seq_len)[:, None]
        k_cache = rng.standard_normal((seq_len, d)) * growth
        v_cache = rng.standard_normal((seq_len, d))
        k_scale, v_scale = rng.choice([1.0, 0.37]), rng.choice([1.0, 2.5])
        params = AttentionParams(d**-0.5, k_scale=k_scale, v_scale=v_scale)
        want = attend(q, k_cache * k_scale, v_cache * v_scale, shape)
        got, p_max = run_blocks(q, k_cache, v_cache, shape, config, params)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
        assert p_max <= 2**RESCALE_LOG2 * (1 + 1e-12), p_max


def test_lazy_rescale_skips_small_growth_and_takes_large() -> None:
    # Steps whose max grows by less than the threshold keep the old max (P up to 2^8);
    # a larger jump rescales. Both give the reference's answer.
    c = v2.DEFAULT_CONFIG
    d, seq_len = 16, 4 * c.sub
    q = np.zeros((c.block_m, d))
    q[:, 0] = 1.0
    for jump, want_max in ((7.0, 2**7), (9.0, 1.0)):
        k = np.zeros((seq_len, d))
        k[c.sub :, 0] = jump / (d**-0.5 * pa.LOG2E)  # step 2 onwards: scores jump by `jump`
        v = np.random.default_rng(0).standard_normal((seq_len, d))
        shape = (c.block_m, seq_len + c.block_m, 1, 0)  # every key visible to every row
        k_all = np.concatenate([k, np.zeros((c.block_m, d))])
        v_all = np.concatenate([v, np.zeros((c.block_m, d))])
        got, p_max = run_blocks(q, k_all, v_all, shape, c, AttentionParams(d**-0.5))
        np.testing.assert_allclose(got, attend(q, k_all, v_all, shape), rtol=1e-9, atol=1e-12)
        assert p_max == pytest.approx(want_max), jump


@pytest.mark.parametrize("config", v2.CONFIGS, ids=lambda c: c.name)
def test_warp_steps_cover_every_visible_key_of_the_warp(config: v2.V2Config) -> None:
    mt = config.block_m // (16 * config.warps)
    for q_len, seq_len, group, window in random_shapes(30, 3):
        vis = visible(q_len, seq_len, group, window)
        ctx = seq_len - q_len
        for z in range(math.ceil(q_len * group / config.block_m)):
            b = block_schedule(z, q_len, seq_len, group, config.block_m, config.block_n, window)
            assert b is not None
            for warp in range(config.warps):
                first = b.m0 + warp * mt * 16
                rows = slice(max(first, 0), max(first + mt * 16, 0))
                keys = np.zeros(seq_len, dtype=bool)
                for n0 in warp_steps(b, config, warp, group, ctx):
                    keys[n0 : n0 + config.sub] = True
                assert not (vis[rows] & ~keys[None, :]).any(), (warp, q_len, seq_len, group)


def emulate_sub_step(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, warp: int, mt_count: int, sub: int, u: int
) -> tuple[np.ndarray, np.ndarray]:
    """One warp's S for keys u * SUB .. + SUB and O = S V over them, addressed as
    prefill_v2_impl addresses the tiles (tile bases 1024-aligned, as after the pad)."""
    bm, d = q.shape
    bn = k.shape[0]
    s_q, s_k = 1024, 1024 + bm * d * 2
    s_v = s_k + bn * d * 2
    smem = Smem(s_v + bn * d * 2)
    for base, tile in ((s_q, q), (s_k, k), (s_v, v)):
        smem.store_tile(base, tile)
    lanes = range(32)
    kaddr = [s_k + swz((ln & 7) + ((ln >> 4) << 3), (ln >> 3) & 1, d) for ln in lanes]
    vaddr = [s_v + swz((ln & 7) + (((ln >> 3) & 1) << 3), ln >> 4, d) for ln in lanes]
    qaddr = [s_q + swz(warp * mt_count * 16 + (ln & 15), ln >> 4, d) for ln in lanes]
    s = np.zeros((mt_count, sub // 8, 32, 4), dtype=np.float32)
    for kk in range(d // 16):
        a = []
        for mt in range(mt_count):
            # the QREG path: qf[mt][kk] loaded once with the plain swizzle
            qf = smem.ldmatrix_x4(
                [
                    s_q + swz(warp * mt_count * 16 + mt * 16 + (ln & 15), (kk * 2) | (ln >> 4), d)
                    for ln in lanes
                ]
            )
            np.testing.assert_array_equal(
                qf, smem.ldmatrix_x4([(qa ^ (kk << 5)) + mt * 16 * d * 2 for qa in qaddr])
            )
            a.append(qf)
        for p in range(sub // 16):
            addrs = [(ka ^ (kk << 5)) + u * sub * d * 2 + p * 16 * d * 2 for ka in kaddr]
            b = smem.ldmatrix_x4(addrs)
            for mt in range(mt_count):
                mma(s[mt, 2 * p], a[mt], b[:, 0], b[:, 1])
                mma(s[mt, 2 * p + 1], a[mt], b[:, 2], b[:, 3])
    o = np.zeros((mt_count, d // 8, 32, 4), dtype=np.float32)
    for dp in range(d // 16):
        for kk in range(sub // 16):
            addrs = [(va ^ (dp << 5)) + u * sub * d * 2 + kk * 16 * d * 2 for va in vaddr]
            b = smem.ldmatrix_x4(addrs, trans=True)
            for mt in range(mt_count):
                pk = np.stack([s[mt, 2 * kk + h, :, x : x + 2] for h in (0, 1) for x in (0, 2)], 1)
                mma(o[mt, 2 * dp], pk, b[:, 0], b[:, 1])
                mma(o[mt, 2 * dp + 1], pk, b[:, 2], b[:, 3])
    s_full = np.concatenate(
        [
            np.concatenate([c_to_matrix(s[m, nt]) for nt in range(sub // 8)], 1)
            for m in range(mt_count)
        ]
    )
    o_full = np.concatenate(
        [
            np.concatenate([c_to_matrix(o[m, dt]) for dt in range(d // 8)], 1)
            for m in range(mt_count)
        ]
    )
    return s_full, o_full


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("config", v2.CONFIGS, ids=lambda c: c.name)
def test_sub_step_fragments_compute_q_kt_and_p_v(config: v2.V2Config, d: int) -> None:
    rng = np.random.default_rng(d + config.sub)
    bm, bn, sub = config.block_m, config.block_n, config.sub
    # small integers: every product and sum is exact in float32
    q = rng.integers(-3, 4, (bm, d)).astype(np.float32)
    k = rng.integers(-3, 4, (bn, d)).astype(np.float32)
    v = rng.integers(-3, 4, (bn, d)).astype(np.float32)
    mt_count = bm // (16 * config.warps)
    for warp in sorted({0, config.warps - 1}):
        for u in sorted({0, bn // sub - 1}):
            s, o = emulate_sub_step(q, k, v, warp, mt_count, sub, u)
            rows, keys = (
                slice(warp * mt_count * 16, (warp + 1) * mt_count * 16),
                slice(u * sub, (u + 1) * sub),
            )
            np.testing.assert_array_equal(s, q[rows] @ k[keys].T)
            np.testing.assert_array_equal(o, s @ v[keys])


def e4m3_bytes() -> np.ndarray:
    """Every finite float8_e4m3fn bit pattern (0x7f and 0xff are NaN)."""
    return np.array([b for b in range(256) if b & 0x7F != 0x7F], dtype=np.uint8)


def test_fp8_widening_is_exact() -> None:
    # widen_fp8x2: e4m3 -> half (cvt), then for bf16 modules half -> float -> bf16 (rn).
    raw = torch.from_numpy(e4m3_bytes()).view(torch.float8_e4m3fn)
    exact = raw.to(torch.float32)
    assert torch.equal(raw.to(torch.float16).to(torch.float32), exact)
    assert torch.equal(raw.to(torch.float16).float().to(torch.bfloat16).float(), exact)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("config", v2.CONFIGS, ids=lambda c: c.name)
def test_fp8_raw_copies_and_widening_fill_the_swizzled_tile(config: v2.V2Config, d: int) -> None:
    threads, bn = config.threads, config.block_n
    cpr, rcpr = d // 8, d // 16  # 16-byte chunks per row: 16-bit tile, FP8 tile
    rng = np.random.default_rng(d)
    tile = rng.choice(e4m3_bytes(), (bn, d))  # the K (or V) rows as the cache holds them
    raw = np.zeros(bn * d, dtype=np.uint8)
    written: list[tuple[int, int]] = []
    for tid in range(threads):  # load_tile: raw_dst(row) = (row * RCPR + rchunk) * 16
        for it in range(bn * rcpr // threads):
            row, rchunk = tid // rcpr + it * (threads // rcpr), tid % rcpr
            dst = (row * rcpr + rchunk) * 16
            raw[dst : dst + 16] = tile[row, rchunk * 16 : rchunk * 16 + 16]
            written.append((row, rchunk))
    assert sorted(written) == [(r, c) for r in range(bn) for c in range(rcpr)]
    widened = Smem(1024 + bn * d * 2)
    seen = []
    for tid in range(threads):  # widen_tiles
        for it in range(bn * cpr // threads):
            u = tid + it * threads
            row, c = u // cpr, u % cpr
            src = row * d + c * 8
            vals = torch.from_numpy(raw[src : src + 8].copy()).view(torch.float8_e4m3fn)
            off = (1024 + swz(row, c, d)) // 2
            widened.mem[off : off + 8] = vals.to(torch.float16).float().numpy()
            seen.append((row, c))
    assert sorted(seen) == [(r, c) for r in range(bn) for c in range(cpr)]
    want = Smem(1024 + bn * d * 2)
    want.store_tile(1024, torch.from_numpy(tile).view(torch.float8_e4m3fn).float().numpy())
    np.testing.assert_array_equal(widened.mem, want.mem)
