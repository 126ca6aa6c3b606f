"""One generated sequence on the gateway side: token diffs in, text deltas and logprobs out.

The worker speaks token ids; this is where they become text. Stop strings are matched by
the incremental detokenizer across token boundaries; when one matches, the sequence is
finished here (`finish_reason` "stop", `stop_reason` the string) and the caller aborts it in
the worker. With stop strings or logprobs, tokens are fed one at a time so the token that
completed the stop string, and each token's text offset, are known exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.detokenizer import IncrementalDetokenizer
from ipc.messages import FinishReason, RequestOutput, SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from gateway.tokenizer import Tokenizer


class TokenStrings:
    """Token id -> its text as a logprob entry shows it (cached; vocabularies are small)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        # Decoded alone, a SentencePiece token loses its leading space ("▁there" -> "there");
        # decoded after an anchor token it keeps it, as OpenAI shows tokens (" there").
        self._anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
        self._anchor_text = tokenizer.decode(self._anchor, skip_special_tokens=False)

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([*self._anchor, token_id], skip_special_tokens=False)
            if self._anchor and text.startswith(self._anchor_text):
                text = text[len(self._anchor_text) :]
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


@dataclass
class Delta:
    """What one update added to a sequence."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # text offset of each token's text
    finished: bool = False

    def worth_sending(self, with_logprobs: bool) -> bool:
        """Does a streamed chunk need to carry this delta? With logprobs, every token's
        entry is sent when it arrives, also while its text is held back ("" for now)."""
        return bool(self.text or self.finished or (with_logprobs and self.logprobs))


class SequenceState:
    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self.params = params
        self.prompt_token_ids = prompt_token_ids
        self.detok = IncrementalDetokenizer(
            tokenizer,
            prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
            stop=list(params.stop),
            include_stop_str_in_output=params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
        )
        self._per_token = bool(params.stop) or params.logprobs is not None
        self.text = ""
        self.num_tokens = 0
        self.logprobs: list[TokenLogprobs] = []
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.error_status = 0  # the worker's hint: 429 overloaded, 503 draining / queue wait
        # Timings for metrics: arrival, first token, finish (time.monotonic()).
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.finished_at: float | None = None
        self.itl: list[float] = []  # gaps between outputs that brought tokens, in seconds
        self.queue_time: float | None = None  # in the worker, before first scheduled

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def stopped_by_string(self) -> bool:
        """Finished here on a stop string, while the worker may still be generating."""
        return self.finish_reason == "stop" and isinstance(self.stop_reason, str)

    def update(self, out: RequestOutput) -> Delta:
        delta = Delta()
        if self.finished:
            return delta
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.num_cached_tokens:
            self.num_cached_tokens = out.num_cached_tokens
        if out.queue_time is not None:
            self.queue_time = out.queue_time
        ids = out.new_token_ids
        if ids:
            now = time.monotonic()
            if self.first_token_at is None:
                self.first_token_at = now
            else:
                self.itl.append(now - self.last_token_at)
            self.last_token_at = now
        # EOS or a stop token id ended it in the worker: that token's text is dropped.
        stop_token = out.finish_reason is FinishReason.STOP
        if self._per_token:
            self._add_one_by_one(out, delta, stop_token)
        elif ids:
            delta.text = self.detok.add(ids, stop_token)
            delta.token_ids = list(ids)
            self.num_tokens += len(ids)
        if self.detok.stopped is not None:
            self._finish("stop", self.detok.stopped)
        elif out.finish_reason is not None:
            delta.text += self.detok.flush()
            if out.finish_reason is FinishReason.ERROR:
                self.error = out.error or "the worker failed this request"
                self.error_status = out.error_status
            self._finish(str(out.finish_reason), out.stop_reason)
        self.text += delta.text
        delta.finished = self.finished
        return delta

    def _add_one_by_one(self, out: RequestOutput, delta: Delta, stop_token: bool) -> None:
        lps = out.new_logprobs
        offset = len(self.text)
        last = len(out.new_token_ids) - 1
        for i, token_id in enumerate(out.new_token_ids):
            piece = self.detok.add([token_id], stop_token and i == last)
            delta.token_ids.append(token_id)
            delta.offsets.append(offset + len(delta.text))
            delta.text += piece
            self.num_tokens += 1
            if lps is not None and i < len(lps):
                delta.logprobs.append(lps[i])
                self.logprobs.append(lps[i])
            if self.detok.stopped is not None:
                break

    def _finish(self, reason: str, stop_reason: int | str | None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finished_at = time.monotonic()
