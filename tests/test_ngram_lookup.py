"""The compiled n-gram search against the numpy statement of its rule."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.spec_decode.ngram import ngram_lookup, ngram_lookup_ref


@settings(max_examples=400, deadline=None)
@given(
    # A small alphabet, so suffixes repeat often and every branch is taken.
    tokens=st.lists(st.integers(0, 3), max_size=40),
    k=st.integers(0, 6),
    min_n=st.integers(1, 4),
    span=st.integers(0, 3),
)
def test_compiled_lookup_equals_reference(tokens: list[int], k: int, min_n: int, span: int) -> None:
    max_n = min_n + span
    assert ngram_lookup(tokens, k, min_n, max_n) == ngram_lookup_ref(tokens, k, min_n, max_n)
