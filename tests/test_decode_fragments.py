"""A lane-by-lane NumPy model of cuda/decode_attention.cu's data layout, on CPU.

The kernel cannot run here, so this test replays its index arithmetic: which K/V elements
each lane copies (the `issue` lambda), how they are handed to mma.sync m16n8k16 (registers
as the PTX ISA lays out A, B and C fragments, modelled independently below), the online
softmax with its lane shuffles, and the block's combine (`finish`). If the model matches
plain attention for any shape, the kernel's fragment bookkeeping is consistent; what it
cannot catch is a typo between this model and the CUDA source, which the GPU tests cover.
"""

from __future__ import annotations

import numpy as np
import pytest

LANES = np.arange(32)
G, T = LANES // 4, LANES % 4  # groupID (lane / 4) and thread in group (lane % 4)


def mma(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """c [32, 4] += A . B with A from a [32, 4 regs, 2 halves], B from b [32, 2, 2], in the
    PTX ISA's m16n8k16 fragment layout."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for e in range(2):
        A[G, 2 * T + e] = a[:, 0, e]
        A[G + 8, 2 * T + e] = a[:, 1, e]
        A[G, 2 * T + 8 + e] = a[:, 2, e]
        A[G + 8, 2 * T + 8 + e] = a[:, 3, e]
        B[2 * T + e, G] = b[:, 0, e]
        B[2 * T + 8 + e, G] = b[:, 1, e]
    C = A @ B
    out = c.copy()
    for e in range(2):
        out[:, e] += C[G, 2 * T + e]
        out[:, 2 + e] += C[G + 8, 2 * T + e]
    return out


def shfl(x: np.ndarray, src: np.ndarray) -> np.ndarray:
    return x[src]


def swz(t):
    """The kernel's swz(): the XOR on token t's 16-byte unit index (t = 0..15 in a tile)."""
    return (((t >> 1) & 3) << 1) ^ ((t & 1) << 2)


def smem_off(t, vec, d, kb):
    """The kernel's smem_off<KB>: byte offset of 8-element vector `vec` of token t's row."""
    rb, u = d * kb, d * kb // 16
    vb = vec * 8 * kb
    return t * rb + (((vb >> 4) ^ (swz(t) & (u - 1))) << 4) + (vb & 15)


def stage_tile(x, tb, lo, t_end, d, kb):
    """The `issue` lambda's copies of one tile's K (or V) rows into a stage half: lane L
    copies unit L % U of tokens L // U + (32 / U) i, zero-filled outside [lo, t_end).
    Returns the half as elements (a 16-byte unit = 16 / kb of them); every unit once."""
    u = d * kb // 16
    epu = 16 // kb  # elements per unit
    half = np.full(16 * d, np.nan)
    written = np.zeros(16 * u, dtype=int)
    for lane in LANES:
        cu, ct = lane % u, lane // u
        for i in range(16 // (32 // u)):
            t = ct + (32 // u) * i
            ok = lo <= tb + t < t_end
            src = x[tb + t, cu * epu : (cu + 1) * epu] if ok else np.zeros(epu)
            phys = t * u + (cu ^ (swz(t) & (u - 1)))
            # The kernel's form: the lane's offset XOR instruction i's constant.
            tpi, rb = 32 // u, d * kb
            lane_soff = ct * rb + ((cu ^ (swz(ct) & (u - 1))) << 4)
            copy_xor = (swz(tpi * i) & (u - 1)) << 4
            assert phys * 16 == tpi * i * rb + (lane_soff ^ copy_xor)
            half[phys * epu : (phys + 1) * epu] = src
            written[phys] += 1
    assert (written == 1).all()  # the swizzle is a bijection within each row
    return half


def read_vec(half, off, kb):
    """One lane's 8-element read of the stage at byte offset `off` (elements times kb)."""
    e = off // kb
    return half[e : e + 8]


def k_read_off(lane, h, p, d, kb):
    """The kernel's k_read_off: the lane's kl = smem_off(n, q) XOR p's part, 8h rows on."""
    kl = smem_off(G[lane], T[lane], d, kb)
    off = 8 * h * d * kb + (kl ^ (32 * kb * p))
    assert off == smem_off(8 * h + G[lane], 4 * p + T[lane], d, kb)
    return off


def v_read_off(lane, u, c, d, kb):
    """The kernel's v_read_off: vl = smem_off(2q, n) XOR u's and c's parts, rows on."""
    rb, units = d * kb, d * kb // 16
    vl = smem_off(2 * T[lane], G[lane], d, kb)
    off = ((u & 1) + 8 * (u >> 1)) * rb + (vl ^ ((swz(u & 1) & (units - 1)) << 4) ^ (64 * kb * c))
    tok = 2 * T[lane] + (u & 1) + 8 * (u >> 1)
    assert off == smem_off(tok, 8 * c + G[lane], d, kb)
    return off


def k_vector(k, tb, h, p, lo, t_end, d=None, kb=2):
    """Lane (n, q)'s K read: token 8h + n, vector 4p + q (dims 8 (4p + q) .. + 7)."""
    d = k.shape[1] if d is None else d
    half = stage_tile(k, tb, lo, t_end, d, kb)
    return np.stack([read_vec(half, k_read_off(i, h, p, d, kb), kb) for i in LANES])


def v_vector(v, tb, u, c, lo, t_end, d=None, kb=2):
    """Its V read: token 2q + (u & 1) + 8 (u >> 1), vector 8c + n (dims 64c + 8n .. + 7)."""
    d = v.shape[1] if d is None else d
    half = stage_tile(v, tb, lo, t_end, d, kb)
    return np.stack([read_vec(half, v_read_off(i, u, c, d, kb), kb) for i in LANES])


def pair(x, y, e):
    """pair(): element e of x in the low half, of y in the high half."""
    return np.stack([x[:, e], y[:, e]], 1)


def q_fragments(q, gcount, d):
    """qa[ks][0 | 1] (two elements a register), rows n < gcount only."""
    qa = np.zeros((32, d // 16, 2, 2))
    for p in range(d // 32):
        vec = np.zeros((32, 8))
        for i in LANES[G < gcount]:  # noqa: SIM300 (the kernel's n < gcount)
            vec[i] = q[G[i], 8 * (4 * p + T[i]) : 8 * (4 * p + T[i]) + 8]
        words = vec.reshape(32, 4, 2)
        qa[:, 2 * p, 0], qa[:, 2 * p, 1] = words[:, 0], words[:, 1]
        qa[:, 2 * p + 1, 0], qa[:, 2 * p + 1, 1] = words[:, 2], words[:, 3]
    return qa


def scores(qa, k, tb, lo, t_end, scale_log2, d):
    """Q K^T of one tile, scaled and masked: [32, 4] (tokens 2q, 2q+1, 8+2q, 9+2q)."""
    s = np.zeros((2, 32, 4))
    zero = np.zeros((32, 2))
    for h in range(2):
        for p in range(d // 32):
            kv = k_vector(k, tb, h, p, lo, t_end).reshape(32, 4, 2)
            for j in range(2):
                a = np.stack([qa[:, 2 * p + j, 0], zero, qa[:, 2 * p + j, 1], zero], 1)
                s[h] = mma(s[h], a, np.stack([kv[:, 2 * j], kv[:, 2 * j + 1]], 1))
    sc = np.zeros((32, 4))
    for e in range(4):
        t = tb + 2 * T + (e & 1) + 8 * (e >> 1)
        val = s[e >> 1][:, e & 1] * scale_log2
        sc[:, e] = np.where((t >= lo) & (t < t_end), val, -np.inf)
    return sc


def warp_state(q, k, v, tokens, lo, t_end, gcount, scale_log2, d):
    """One warp over its tiles (16-token bases): m, l, o as the kernel holds them per lane."""
    qa = q_fragments(q, gcount, d)
    o = np.zeros((32, d // 16, 4))
    m_run = np.full(32, -np.inf)
    l_run = np.zeros(32)
    for tb in tokens:
        sc = scores(qa, k, tb, lo, t_end, scale_log2, d)
        mx = sc.max(1)
        mx = np.maximum(mx, shfl(mx, LANES ^ 1))
        mx = np.maximum(mx, shfl(mx, LANES ^ 2))
        m_new = np.maximum(m_run, mx)
        if (m_new > m_run).any():
            with np.errstate(invalid="ignore"):
                corr = np.where(m_new == m_run, 1.0, np.exp2(m_run - m_new))
            l_run = l_run * corr
            ca, cb = shfl(corr, 8 * T), shfl(corr, 8 * T + 4)
            o[:, :, 0] *= ca[:, None]
            o[:, :, 1] *= cb[:, None]
            o[:, :, 2] *= ca[:, None]
            o[:, :, 3] *= cb[:, None]
            m_run = m_new
        base = np.where(m_run == -np.inf, 0.0, m_run)
        pr = np.exp2(sc - base[:, None])
        l_run = l_run + pr.sum(1)
        pb = np.stack([pr[:, 0:2], pr[:, 2:4]], 1)
        for c in range(d // 64):
            vv = [v_vector(v, tb, u, c, lo, t_end) for u in range(4)]
            for j in range(4):
                a = np.stack(
                    [pair(vv[0], vv[1], j), pair(vv[0], vv[1], 4 + j)]
                    + [pair(vv[2], vv[3], j), pair(vv[2], vv[3], 4 + j)],
                    1,
                )
                o[:, 4 * c + j] = mma(o[:, 4 * c + j], a, pb)
    return m_run, l_run, o


def block_output(states, gcount, d):
    """finish(): the warps' states combined; returns [gcount, d] (before v_scale)."""
    mt = d // 16
    sm_m, sm_l, sm_o = [], [], []
    for m_run, l_run, o in states:
        lsum = l_run + shfl(l_run, LANES ^ 1)
        lsum = lsum + shfl(lsum, LANES ^ 2)
        sm_m.append(m_run[::4][:8])
        sm_l.append(lsum[::4][:8])
        ow = np.zeros((8, d))
        for i in range(mt):
            dd = 64 * (i // 4) + 8 * G + (i % 4)
            ow[2 * T, dd] = o[:, i, 0]
            ow[2 * T + 1, dd] = o[:, i, 1]
            ow[2 * T, dd + 4] = o[:, i, 2]
            ow[2 * T + 1, dd + 4] = o[:, i, 3]
        sm_o.append(ow)
    mx = np.max(sm_m, 0)
    base = np.where(mx == -np.inf, 0.0, mx)
    w = np.exp2(np.array(sm_m) - base)  # [W, 8]
    total = (np.array(sm_l) * w).sum(0)
    acc = (np.array(sm_o) * w[:, :, None]).sum(0)
    return (acc / total[:, None])[:gcount]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(
    ("gcount", "seq_len", "window"), [(4, 100, 0), (1, 37, 0), (7, 77, 21), (8, 16, 0)]
)
def test_fragment_layout_computes_attention(d: int, gcount: int, seq_len: int, window: int) -> None:
    """Through the stage layout of a 16-bit cache (the FP8 one: test_stage_layout_fp8)."""
    rng = np.random.default_rng(d + seq_len)
    q = rng.standard_normal((8, d))
    k = rng.standard_normal((seq_len + 32, d))
    v = rng.standard_normal((seq_len + 32, d))
    k[seq_len:] = v[seq_len:] = np.nan  # past the end: must never be read
    scale = d**-0.5
    lo = max(0, seq_len - window) if window else 0
    first = lo & ~15
    if lo > first:
        k[first:lo] = v[first:lo] = np.nan  # before the window: likewise
    warps = 2
    tiles = list(range(first, seq_len, 16))
    states = [
        warp_state(q, k, v, tiles[w::warps], lo, seq_len, gcount, scale * np.log2(np.e), d)
        for w in range(warps)
    ]
    got = block_output(states, gcount, d)
    s = q[:gcount] @ k[lo:seq_len].T * scale
    p = np.exp(s - s.max(1, keepdims=True))
    want = (p / p.sum(1, keepdims=True)) @ v[lo:seq_len]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def _phase_banks_distinct(offsets, nbytes):
    """offsets: one shared-memory access per lane of nbytes each; True if no two lanes of a
    phase (128 bytes: 128 / nbytes lanes) touch different words of the same bank."""
    per_phase = 128 // nbytes
    for ph in range(0, 32, per_phase):
        seen = {}
        for off in offsets[ph : ph + per_phase]:
            for word in range(off // 4, (off + nbytes) // 4):
                if seen.setdefault(word % 32, word) != word:
                    return False
    return True


@pytest.mark.parametrize("kb", [1, 2])
def test_stage_reads_are_bank_conflict_free(kb: int) -> None:
    """Head dim 128: every fragment-shaped read and every copy's store hits 32 banks once."""
    d, u = 128, 128 * kb // 16
    nbytes = 8 * kb  # one 8-element vector
    for h in range(2):
        for p in range(d // 32):
            offs = [smem_off(8 * h + G[i], 4 * p + T[i], d, kb) for i in LANES]
            assert _phase_banks_distinct(offs, nbytes), ("K", h, p)
    for uu in range(4):
        for c in range(d // 64):
            tok = 2 * T + (uu & 1) + 8 * (uu >> 1)
            offs = [smem_off(tok[i], 8 * c + G[i], d, kb) for i in LANES]
            assert _phase_banks_distinct(offs, nbytes), ("V", uu, c)
    for i in range(16 // (32 // u)):
        t = LANES // u + (32 // u) * i
        cu = LANES % u
        offs = [t[j] * d * kb + ((cu[j] ^ (swz(t[j]) & (u - 1))) << 4) for j in LANES]
        assert _phase_banks_distinct(offs, 16), ("copy", i)


@pytest.mark.parametrize("d", [64, 128])
def test_stage_layout_fp8(d: int) -> None:
    """An FP8 row (one byte an element, 8-byte reads): each lane reads its own vectors."""
    rng = np.random.default_rng(d)
    x = rng.standard_normal((48, d))
    tb, lo, t_end = 16, 19, 29
    for h in range(2):
        for p in range(d // 32):
            got = k_vector(x, tb, h, p, lo, t_end, d, kb=1)
            want = k_vector(x, tb, h, p, lo, t_end, d, kb=2)
            np.testing.assert_array_equal(got, want)
            t = tb + 8 * h + G
            ok = (t >= lo) & (t < t_end)
            cols = 8 * (4 * p + T)[:, None] + np.arange(8)
            np.testing.assert_array_equal(got[ok], x[t[ok, None], cols[ok]])
            assert (got[~ok] == 0).all()
    for uu in range(4):
        for c in range(d // 64):
            got = v_vector(x, tb, uu, c, lo, t_end, d, kb=1)
            np.testing.assert_array_equal(got, v_vector(x, tb, uu, c, lo, t_end, d, kb=2))


def pipeline_trace(my_tiles: int, stages: int) -> list[tuple[int, int]]:
    """The main loop's cp.async schedule (prologue: a group per stage; each iteration:
    wait_group<STAGES - 1>, read stage k % STAGES, refill it with tile k + STAGES, commit):
    the (tile, stage) each iteration reads, checked against what landed where."""
    groups: list[list[tuple[int, int]]] = []  # committed groups: (tile, stage) copies
    content: dict[int, int] = {}
    reads = []
    for s in range(stages):
        groups.append([(s, s)] if s < my_tiles else [])
    for k in range(my_tiles):
        done = len(groups) - (stages - 1)  # wait_group<STAGES - 1>: all but the newest
        for g in groups[:done]:
            for tile, stage in g:
                content[stage] = tile
        assert content.get(k % stages) == k, (k, content)
        reads.append((k, k % stages))
        pending = [c for g in groups[done:] for c in g]
        assert all(st != k % stages for _, st in pending)  # nothing in flight into it
        groups.append([(k + stages, k % stages)] if k + stages < my_tiles else [])
    return reads


@pytest.mark.parametrize("stages", [2, 3, 4, 5])
def test_pipeline_reads_each_tile_once_from_its_stage(stages: int) -> None:
    for my_tiles in range(0, 13):
        assert pipeline_trace(my_tiles, stages) == [(k, k % stages) for k in range(my_tiles)]


@pytest.mark.parametrize("kb", [1, 2])
@pytest.mark.parametrize("d", [64, 128])
def test_read_offsets_are_smem_off(d: int, kb: int) -> None:
    """k_read_off / v_read_off (the lane's base XOR a constant) equal smem_off everywhere."""
    for lane in LANES:
        for h in range(2):
            for p in range(d // 32):
                k_read_off(lane, h, p, d, kb)
        for u in range(4):
            for c in range(d // 64):
                v_read_off(lane, u, c, d, kb)
