"""The serving runner chat and completions share, and what it is made of: applying engine
outputs to sequences, errors from finished sequences, metrics, token strings.

`serve(run)` answers one request, whole or streamed over SSE; `run` (serving_chat.ChatRun,
serving_completions.CompletionRun) holds the request's sequences and renders them in its
API's shape.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

from gateway.engine_client import ModelEntry
from gateway.errors import (
    APIError,
    BadRequest,
    InternalError,
    ServiceUnavailable,
    TooManyRequests,
)
from gateway.inflight import Submission
from gateway.metrics import Metrics
from gateway.protocol import StreamOptions
from gateway.sequence import Delta, SequenceState, TokenStrings
from gateway.sse import DONE, error_event

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
    if seq.error_status == 503:  # draining, queue wait, or its worker was lost
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


class Renderer(Protocol):
    """One request in flight, and how its API renders its sequences."""

    entry: ModelEntry
    metrics: Metrics | None
    seqs: list[SequenceState]
    sub: Submission

    @property
    def stream(self) -> bool: ...
    @property
    def stream_options(self) -> StreamOptions | None: ...
    def head(self) -> bytes:
        """SSE events before any token (b"" for none)."""
        ...

    def events(self, updates: list[tuple[int, Delta]]) -> list[bytes]:
        """SSE events for one batch of updates."""
        ...

    def usage_event(self) -> bytes: ...
    def response(self, deltas: list[Delta]) -> Any:
        """The whole response, given every sequence's accumulated delta."""
        ...


async def serve(run: Renderer) -> Any:
    """The response body, or an SSE byte stream when the request streams."""
    if run.stream:
        return _stream(run)
    try:
        return await _collect(run)
    finally:
        observe_aborted(run.metrics, run.entry.name, run.seqs)
        run.sub.close()


async def _collect(run: Renderer) -> Any:
    deltas = [Delta() for _ in run.seqs]
    async for updates in sequence_updates(run.sub, run.seqs):
        for index, d in updates:
            acc = deltas[index]
            acc.text += d.text
            acc.token_ids += d.token_ids
            acc.logprobs += d.logprobs
            acc.offsets += d.offsets
    for acc in deltas:
        acc.finished = True
    observe_all(run.metrics, run.entry.name, run.seqs)
    return run.response(deltas)


async def _stream(run: Renderer) -> AsyncGenerator[bytes, None]:
    try:
        head = run.head()
        if head:
            yield head
        async for updates in sequence_updates(run.sub, run.seqs):
            events = run.events(updates)
            if events:
                yield b"".join(events)
        observe_all(run.metrics, run.entry.name, run.seqs)
        opts = run.stream_options
        if opts is not None and opts.include_usage:
            yield run.usage_event()
        yield DONE
    except APIError as e:
        yield error_event(e)
        yield DONE
    finally:
        observe_aborted(run.metrics, run.entry.name, run.seqs)
        run.sub.close()
