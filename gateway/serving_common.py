"""Pieces both serving modules use: applying engine outputs to sequences, errors from
finished sequences, metrics, token strings."""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.engine_client import ModelEntry, Submission
from gateway.errors import (
    APIError,
    BadRequest,
    InternalError,
    ServiceUnavailable,
    TooManyRequests,
)
from gateway.metrics import Metrics
from gateway.sequence import Delta, SequenceState, TokenStrings

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
    if index in sub.lost or seq.error_status == 503:
        return ServiceUnavailable(message)
    if seq.error_status == 429:
        return TooManyRequests(message)
    if seq.num_tokens == 0:
        return BadRequest(message)  # rejected at admission (does not fit, say)
    return InternalError(message)


def observe_all(metrics: Metrics | None, model: str, seqs: list[SequenceState]) -> None:
    if metrics is None:
        return
    for seq in seqs:
        metrics.observe(model, seq)


def observe_aborted(metrics: Metrics | None, model: str, seqs: list[SequenceState]) -> None:
    """Count the sequences that never finished (client gone, or a sibling failed) as aborts."""
    if metrics is None:
        return
    for seq in seqs:
        if not seq.finished:
            metrics.observe_abort(model)


async def sequence_updates(
    sub: Submission, seqs: list[SequenceState]
) -> AsyncIterator[list[tuple[int, Delta]]]:
    """Each batch of engine outputs applied to its sequences: (index, delta) per update.

    A sequence that a stop string ended is aborted in the engine; outputs for sequences
    already finished are dropped. A sequence that ended in ERROR raises its APIError, after
    the updates before it in the same batch have been yielded.
    """
    async for batch in sub:
        updates: list[tuple[int, Delta]] = []
        error: APIError | None = None
        for index, out in batch:
            seq = seqs[index]
            if seq.finished:
                continue
            delta = seq.update(out)
            if seq.stopped_by_string:
                sub.abort(index)
            if seq.error is not None:
                error = finish_error(sub, index, seq)
                break
            updates.append((index, delta))
        if updates:
            yield updates
        if error is not None:
            raise error
