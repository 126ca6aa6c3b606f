"""POST /v1/completions: prompts (text or token ids) -> n completions each, streamed or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator

import msgspec

from gateway.decode import offload
from gateway.engine_client import EngineClient, ModelEntry
from gateway.errors import BadRequest
from gateway.inflight import Child, Submission
from gateway.metrics import Metrics
from gateway.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprob,
    StreamOptions,
    Usage,
)
from gateway.sampling_params import (
    build_params,
    check_length,
    check_request_shape,
    fan_out,
    truncate_prompt,
)
from gateway.sequence import Delta, SequenceState, TokenStrings
from gateway.serving_common import serve, token_strings
from gateway.sse import event
from gateway.structured_output import checked_guided_decoding
from ipc.messages import GuidedDecoding, TokenLogprobs


def parse_prompts(req: CompletionRequest, entry: ModelEntry) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) per prompt, whichever of the four OpenAI shapes was sent."""
    tok = entry.tokenizer
    assert tok is not None
    p = req.prompt
    if p is None:
        raise BadRequest("prompt is required", "prompt")
    if isinstance(p, str):
        texts: list[str] | None = [p]
        ids_list = None
    elif not p:
        raise BadRequest("prompt must not be an empty list", "prompt")
    elif all(isinstance(x, str) for x in p):
        texts, ids_list = [x for x in p if isinstance(x, str)], None
    elif all(isinstance(x, int) for x in p):
        texts, ids_list = None, [[x for x in p if isinstance(x, int)]]
    elif all(isinstance(x, list) for x in p):
        texts, ids_list = None, [x for x in p if isinstance(x, list)]
    else:
        raise BadRequest(
            "prompt must be a string, a list of strings, a list of token ids, or a list of "
            "lists of token ids",
            "prompt",
        )
    if texts is not None:
        return [(t, tok.encode(t, add_special_tokens=req.add_special_tokens)) for t in texts]
    assert ids_list is not None
    vocab = entry.info.vocab_size
    for ids in ids_list:
        if any(not 0 <= t < vocab for t in ids):
            raise BadRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
    return [(None, ids) for ids in ids_list]


def prompt_chars(req: CompletionRequest) -> int:
    p = req.prompt
    if isinstance(p, str):
        return len(p)
    return sum(len(x) for x in p if isinstance(x, str | list)) if p else 0


class CompletionRun:
    """One /v1/completions call in flight: its sequences, and how to render them."""

    def __init__(
        self,
        client: EngineClient,
        metrics: Metrics | None,
        req: CompletionRequest,
        guided: GuidedDecoding | None = None,
        prompts: list[tuple[str | None, list[int]]] | None = None,  # parsed already
    ):
        if req.suffix:
            raise BadRequest("suffix is not currently supported", "suffix")
        self.req = req
        self.metrics = metrics
        self.entry = entry = client.model(req.model)
        tok = entry.tokenizer
        assert tok is not None
        check_request_shape(req, entry.info.vocab_size)
        self.n = req.n if req.n is not None else 1
        opts = req.stream_options
        self.continuous = bool(opts and opts.include_usage and opts.continuous_usage_stats)
        prompts = prompts if prompts is not None else parse_prompts(req, entry)
        keep, limit = req.truncate_prompt_tokens, entry.info.max_model_len
        self.prompts = []
        for text, ids in prompts:
            kept = truncate_prompt(ids, keep, limit)
            # A truncated prompt is echoed as what the model saw.
            self.prompts.append((text if len(kept) == len(ids) else None, kept))
        want_prompt_lps = req.echo and req.logprobs is not None
        info = entry.info
        max_tokens = req.max_tokens
        if max_tokens is msgspec.UNSET:  # the model's max_new_tokens, else OpenAI's 16
            max_tokens = None if "max_tokens" in info.sampling_defaults else 16
        # vLLM's echo with max_tokens 0: the prompt (and its logprobs) back, nothing
        # generated; the engine makes one token, which is dropped here.
        self.echo_only = bool(req.echo) and max_tokens == 0
        if self.echo_only:
            max_tokens = 1
        base = build_params(
            req, max_tokens, req.logprobs, info.max_logprobs, guided, info.sampling_defaults
        )
        if want_prompt_lps and base.prompt_logprobs is None:
            base = msgspec.structs.replace(base, prompt_logprobs=req.logprobs)
        self.request_id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.strings: TokenStrings = token_strings(entry)
        children: list[Child] = []
        self.seqs: list[SequenceState] = []
        for p, (_, ids) in enumerate(self.prompts):
            params = check_length(len(ids), base, entry.info.max_model_len)
            for i, child_params in enumerate(fan_out(params)):
                children.append(Child(f"{self.request_id}-{p}-{i}", ids, child_params))
                self.seqs.append(SequenceState(tok, ids, child_params))
        self.sub: Submission = client.submit(entry.name, children)
        self.first = [True] * len(self.seqs)  # streamed: no chunk sent for the choice yet

    @property
    def stream(self) -> bool:
        return bool(self.req.stream)

    @property
    def stream_options(self) -> StreamOptions | None:
        return self.req.stream_options

    def head(self) -> bytes:
        return b""

    def events(self, updates: list[tuple[int, Delta]]) -> list[bytes]:
        events: list[bytes] = []
        for index, d in updates:
            first = self.first[index]
            with_lps = self.req.logprobs is not None
            if not (d.worth_sending(with_lps) or (first and self.req.echo)):
                continue
            choice = self.choice(index, d, first)
            self.first[index] = False
            events.append(self._event([choice]))
        return events

    def usage_event(self) -> bytes:
        return self._event([], self.usage())

    def _event(self, choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        if usage is None and self.continuous and len(choices) == 1:
            # continuous_usage_stats: each chunk carries its choice's counts so far.
            index = choices[0].index
            prompt = len(self.prompts[index // self.n][1])
            done = 0 if self.echo_only else self.seqs[index].num_tokens
            usage = Usage(prompt, done, prompt + done)
        return event(
            CompletionResponse(self.request_id, self.created, self.entry.name, choices, usage)
        )

    def response(self, deltas: list[Delta]) -> CompletionResponse:
        choices = [self.choice(index, acc, first=True) for index, acc in enumerate(deltas)]
        return CompletionResponse(
            self.request_id, self.created, self.entry.name, choices, self.usage()
        )

    def prompt_text(self, index: int) -> str:
        text, ids = self.prompts[index // self.n]
        if text is None:
            assert self.entry.tokenizer is not None
            text = self.entry.tokenizer.decode(ids)
        return text

    def usage(self) -> Usage:
        prompt = sum(len(ids) for _, ids in self.prompts)
        completion = 0 if self.echo_only else sum(s.num_tokens for s in self.seqs)
        return Usage(prompt, completion, prompt + completion)

    def logprobs(self, index: int, delta_lps: list[TokenLogprobs], offsets: list[int],
                 token_ids: list[int], with_prompt: bool, text_base: int) -> CompletionLogprobs:  # fmt: skip
        """OpenAI's legacy logprobs object for these tokens (and the prompt's, when echoed)."""
        out = CompletionLogprobs()
        s = self.strings
        seq = self.seqs[index]
        if with_prompt:
            pos = 0
            for j, tid in enumerate(seq.prompt_token_ids):
                lp = (
                    seq.prompt_logprobs[j]
                    if seq.prompt_logprobs and j < len(seq.prompt_logprobs)
                    else None
                )
                text = s(tid)
                out.tokens.append(text)
                out.text_offset.append(pos)
                pos += len(text)
                out.token_logprobs.append(None if lp is None else lp.logprobs[0])
                out.top_logprobs.append(None if lp is None else _top_dict(lp, s))
        for tid, lp, off in zip(token_ids, delta_lps, offsets, strict=False):
            out.tokens.append(s(tid))
            out.text_offset.append(text_base + off)
            out.token_logprobs.append(lp.logprobs[0])
            out.top_logprobs.append(_top_dict(lp, s))
        return out

    def choice(self, index: int, delta: Delta, first: bool) -> CompletionChoice:
        seq = self.seqs[index]
        if self.echo_only:
            delta = Delta(finished=delta.finished)
        echo = self.req.echo and first
        prefix = self.prompt_text(index) if echo else ""
        lps = None
        if self.req.logprobs is not None:
            base = len(prefix) if self.req.echo else 0
            lps = self.logprobs(index, delta.logprobs, delta.offsets, delta.token_ids, echo, base)
        choice = CompletionChoice(
            index=index,
            text=prefix + delta.text,
            logprobs=lps,
            finish_reason=seq.finish_reason if delta.finished else None,
            stop_reason=seq.stop_reason if delta.finished else None,
            prompt_logprobs=prompt_logprobs(seq, self.strings) if first else None,
        )
        if self.req.return_token_ids:  # vLLM's: the prompt's ids in a choice's first chunk
            choice.token_ids = delta.token_ids
            if first:
                choice.prompt_token_ids = seq.prompt_token_ids
        return choice


async def create_completion(
    client: EngineClient, metrics: Metrics | None, req: CompletionRequest
) -> CompletionResponse | AsyncGenerator[bytes, None]:
    guided = await checked_guided_decoding(req)
    # Long texts are tokenized in a thread, so other streams' tokens keep flowing.
    prompts = await offload(prompt_chars(req), parse_prompts, req, client.model(req.model))
    result: CompletionResponse | AsyncGenerator[bytes, None] = await serve(
        CompletionRun(client, metrics, req, guided, prompts)
    )
    return result


def prompt_logprobs(
    seq: SequenceState, s: TokenStrings
) -> list[dict[int, PromptLogprob] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first), the token's own
    entry and its top alternatives, keyed by token id."""
    if seq.prompt_logprobs is None:
        return None
    out: list[dict[int, PromptLogprob] | None] = []
    for lp in seq.prompt_logprobs:
        if lp is None:
            out.append(None)
            continue
        entry: dict[int, PromptLogprob] = {}
        ranks = [lp.rank, *range(1, len(lp.token_ids))]
        for tid, value, rank in zip(lp.token_ids, lp.logprobs, ranks, strict=False):
            entry.setdefault(tid, PromptLogprob(value, rank, s(tid)))
        out.append(entry)
    return out


def _top_dict(lp: TokenLogprobs, s: TokenStrings) -> dict[str, float]:
    # The chosen token first, then the top alternatives; a token already present keeps
    # its first (the chosen token's) logprob.
    top: dict[str, float] = {}
    for tid, value in zip(lp.token_ids, lp.logprobs, strict=False):
        top.setdefault(s(tid), value)
    return top
