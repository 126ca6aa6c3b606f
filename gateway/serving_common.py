"""Pieces both serving modules use: errors from finished sequences, metrics, token strings."""

from __future__ import annotations

from gateway.engine_client import ModelEntry, Submission
from gateway.errors import APIError, BadRequest, InternalError, ServiceUnavailable
from gateway.metrics import Metrics
from gateway.sequence import SequenceState, TokenStrings

_strings: dict[int, TokenStrings] = {}


def token_strings(entry: ModelEntry) -> TokenStrings:
    """The token-string cache of this model's tokenizer (one per tokenizer object)."""
    tok = entry.tokenizer
    assert tok is not None
    cached = _strings.get(id(tok))
    if cached is None or cached.tokenizer is not tok:
        cached = _strings[id(tok)] = TokenStrings(tok)
    return cached


def finish_error(sub: Submission, index: int, seq: SequenceState) -> APIError:
    """The API error for a sequence that ended in ERROR; its siblings are aborted."""
    sub.close()
    message = seq.error or "the request failed"
    if index in sub.lost:
        return ServiceUnavailable(message)
    if seq.num_tokens == 0:
        return BadRequest(message)  # rejected at admission (does not fit, say)
    return InternalError(message)


def observe_all(metrics: Metrics | None, model: str, seqs: list[SequenceState]) -> None:
    if metrics is None:
        return
    for seq in seqs:
        metrics.observe(model, seq)
