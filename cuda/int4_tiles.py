"""The "tiles" layout of 4-bit weights: what the tensor-core GEMV (gemv_tiles in
cuda/int4_gemm.cu) reads, one 16-byte load per lane per 16 x 64 tile, each lane's nibbles
already where mma.sync's A fragment wants them.

The weight W [N, K] (rows = output channels) is cut into 16 x 64 tiles (N/16 x K/64 of
them, row-major over (tile row, tile column)); a tile is 32 lanes x 4 words (512 bytes).
mma.m16n8k16 takes A = a 16 x 16 slice of W (one "k-step"; a tile has 4 of them, word i =
k-step i) and B = x^T (16 x 8: up to 8 rows of x). Lane L = 4 g + c holds, in A register s
(s = 0..3), the pair (row, col), (row, col + 1) with

    row = g + 8 (s & 1)          col = 2 c + 8 (s >> 1)      (PTX ISA, mma.m16n8k16 A frag)

and B's rows 2c, 2c + 1, 2c + 8, 2c + 9 in its two registers. mma sums over its 16
columns, so which input each column is only has to agree between A and B: column
2c + h + 8 j of k-step i is input 16 c + 4 i + 2 j + h of the tile, so a lane's inputs
are 16 contiguous ones (two 16-byte loads of x per tile). The word stores A register s's
pair in nibbles s (first) and s + 4 (second), so `(word >> 4 s) & 0x000F000F` puts the
two 4-bit values in the two 16-bit halves, where OR 0x4300 (bf16 128.0; fp16: 0x6400,
1024.0) makes them exact 16-bit numbers.

Stored as int32 [N, K / 8] like the rows layout (same bytes, another order), so a layer's
parameter keeps its shape; `to_tiles` / `from_tiles` convert whole weights (at load, on
the weight's device), `tiles_ok` says which shapes can use it.
"""

from __future__ import annotations

import torch

TILE_N, TILE_K = 16, 64


def _local_index(device: torch.device) -> torch.Tensor:
    """[32 * 4 * 8]: for (lane, word i, nibble p), the tile-local r * 64 + k it holds."""
    lane = torch.arange(32, device=device).view(32, 1, 1)
    i = torch.arange(4, device=device).view(1, 4, 1)
    p = torch.arange(8, device=device).view(1, 1, 8)
    g, c, s, second = lane // 4, lane % 4, p % 4, p // 4
    r = g + 8 * (s & 1)
    k = 16 * c + 4 * i + 2 * (s >> 1) + second  # mma column 2c + second + 8 (s >> 1)
    return (r * TILE_K + k).reshape(-1)


def tiles_ok(n: int, k: int, group_size: int) -> bool:
    return n % TILE_N == 0 and k % TILE_K == 0 and group_size % TILE_K == 0


def _values(qw: torch.Tensor) -> torch.Tensor:
    """rows-layout int32 [N, K / 8] -> uint8 [N, K], nibble j of word w = column 8 w + j."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qw.device)
    return ((qw.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8).reshape(qw.shape[0], -1)


def _pack8(v: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 8] -> int32 [...]: element j in bits 4 j .. 4 j + 3."""
    words = torch.zeros(v.shape[:-1], dtype=torch.int64, device=v.device)
    for j in range(8):
        words |= v[..., j].to(torch.int64) << (4 * j)
    words -= (words >= 2**31).to(torch.int64) << 32
    return words.to(torch.int32)


def to_tiles(qw: torch.Tensor) -> torch.Tensor:
    """rows layout int32 [N, K / 8] -> tiles layout, same shape."""
    n, k = qw.shape[0], qw.shape[1] * 8
    v = _values(qw).view(n // TILE_N, TILE_N, k // TILE_K, TILE_K).permute(0, 2, 1, 3)
    v = v.reshape(n // TILE_N, k // TILE_K, TILE_N * TILE_K)  # tile-local r * 64 + k
    t = v[:, :, _local_index(qw.device)].view(n // TILE_N, k // TILE_K, 32, 4, 8)
    return _pack8(t).reshape(n, k // 8)


def from_tiles(qt: torch.Tensor) -> torch.Tensor:
    """tiles layout int32 [N, K / 8] -> rows layout, same shape (inverse of to_tiles)."""
    n, k = qt.shape[0], qt.shape[1] * 8
    t = _values(qt).reshape(n // TILE_N, k // TILE_K, TILE_N * TILE_K)  # (lane, i, p) order
    v = torch.empty_like(t)
    v[:, :, _local_index(qt.device)] = t
    v = v.view(n // TILE_N, k // TILE_K, TILE_N, TILE_K).permute(0, 2, 1, 3).reshape(n, k)
    return _pack8(v.reshape(n, k // 8, 8))
