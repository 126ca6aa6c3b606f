"""N-gram prompt lookup: propose the tokens that followed the last occurrence of the suffix.

    tokens:   The cat sat on the mat . The cat sat on the
                                       suffix (n=2): "on the"
    earlier:        "on the" at 3..4 -> propose what followed: "mat . The ..."

The longest suffix (ngram_prompt_lookup_max down to _min tokens) that occurred before wins;
among its occurrences the latest that still has k tokens after it, else the latest. No
model, no probabilities: as a draft distribution it is a point mass at each proposal.

The search runs compiled (`numba.njit`, as vLLM's does): a scan from the end with early
exits, no [L, n] window array per request per step. `ngram_lookup_ref` is the numpy
statement of the same rule that the tests hold it to.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from worker.request import Request

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack  # type: ignore[attr-defined]  # numba-cuda needs it; numpy 2.5 dropped it

import numba


@numba.njit(cache=True, nogil=True)
def _match(arr: np.ndarray, k: int, min_n: int, max_n: int) -> tuple[int, int]:  # pragma: no cover
    # Returns (begin, count) of the proposal in arr, count 0 when nothing matches.
    L = arr.shape[0]
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        latest = -1
        # Match starts s with s + n <= L - 1 (windows end before the last token), latest first.
        for s in range(L - 1 - n, -1, -1):
            ok = True
            for j in range(n):
                if arr[s + j] != arr[L - n + j]:
                    ok = False
                    break
            if ok:
                if latest < 0:
                    latest = s
                if s + n + k <= L:
                    return s + n, k
        if latest >= 0:
            return latest + n, min(k, L - latest - n)
    return 0, 0


def ngram_lookup(tokens: list[int] | np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k proposed continuations of `tokens` (prompt + output), or [] when none match."""
    if len(tokens) < 2 or k < 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    begin, count = _match(arr, k, min_n, max_n)
    return arr[begin : begin + count].tolist()


def ngram_lookup_ref(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k proposed continuations of `tokens` (prompt + output), or [] when none match."""
    L = len(tokens)
    if L < 2 or k < 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        # Windows that end before the last token: the suffix itself is not a match.
        windows = sliding_window_view(arr[: L - 1], n)  # [L - n, n]
        starts = np.flatnonzero((windows == arr[L - n :]).all(axis=1))
        if starts.size:
            full = starts[starts + n + k <= L]
            begin = int((full if full.size else starts)[-1]) + n
            return arr[begin : begin + k].tolist()
    return []


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        # Compile (or load from numba's cache) now, at start-up: a first call in the engine
        # loop would stall it for seconds, long enough for gateways to miss heartbeats.
        ngram_lookup([0, 0], 1, 1, 1)
        self.draft_probs: dict[str, torch.Tensor] = {}  # stays empty: q is a point mass

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        return [
            ngram_lookup(r.all_token_ids, k, self.min_n, self.max_n)
            for r, k in zip(requests, num_tokens, strict=True)
        ]

    def release(self) -> None:
        """Nothing on the device to free."""

    def retain(self, request_ids: set[str]) -> None:
        """Nothing is kept per request."""
