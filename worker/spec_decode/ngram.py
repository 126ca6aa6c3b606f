"""N-gram prompt lookup: propose the tokens that followed the last occurrence of the suffix.

    tokens:   The cat sat on the mat . The cat sat on the
                                       suffix (n=2): "on the"
    earlier:        "on the" at 3..4 -> propose what followed: "mat . The ..."

The longest suffix (ngram_prompt_lookup_max down to _min tokens) that occurred before wins;
among its occurrences the latest that still has k tokens after it, else the latest. No
model, no probabilities: as a draft distribution it is a point mass at each proposal.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from worker.request import Request


def ngram_lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
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
        self.draft_probs: dict[str, torch.Tensor] = {}  # stays empty: q is a point mass

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        return [
            ngram_lookup(r.all_token_ids, k, self.min_n, self.max_n)
            for r, k in zip(requests, num_tokens, strict=True)
        ]

    def retain(self, request_ids: set[str]) -> None:
        """Nothing is kept per request."""
