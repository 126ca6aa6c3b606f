"""Prefix-cache block keys: a hash chained from the parent block's key.

Pure Python and stable across processes (no PYTHONHASHSEED dependence), so a gateway can
compute the same keys to route a prompt to the worker that holds its prefix.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = 0  # the "parent" of a request's first block


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
    """64-bit key of a full block: blake2b(parent key, token ids, extra keys)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_hash.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return int.from_bytes(h.digest(), "little")


def block_hashes(
    token_ids: Sequence[int], block_size: int, extra_keys: tuple = (), limit: int | None = None
) -> list[int]:
    """Keys of the full blocks of `token_ids` (at most `limit` of them)."""
    n = len(token_ids) // block_size
    if limit is not None:
        n = min(n, limit)
    keys: list[int] = []
    parent = ROOT_HASH
    for i in range(n):
        parent = hash_block_tokens(
            parent, token_ids[i * block_size : (i + 1) * block_size], extra_keys
        )
        keys.append(parent)
    return keys
