"""POST /v1/chat/completions: messages -> the model's chat template -> n completions.

Streaming follows OpenAI: each choice's first chunk carries `delta.role`, then content
deltas, and the chunk that finishes a choice carries its `finish_reason`; with
`stream_options.include_usage` a last chunk has empty `choices` and the usage.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from gateway.engine_client import Child, EngineClient, ModelEntry, Submission
from gateway.errors import APIError, BadRequest
from gateway.metrics import Metrics
from gateway.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprob,
    ChatMessage,
    ChatStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    TopLogprob,
    Usage,
)
from gateway.sampling_params import build_params, check_length, fan_out
from gateway.sequence import SequenceState, TokenStrings
from gateway.serving_common import observe_aborted, observe_all, sequence_updates, token_strings
from gateway.sse import DONE, error_event, event
from ipc.messages import TokenLogprobs


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant", "developer", "tool"):
            raise BadRequest(f"messages[{i}].role {m.role!r} is not supported", "messages")
        content: Any = m.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise BadRequest(
                        f"messages[{i}].content[{j}]: content parts of type {part.type!r} are "
                        "not supported (only 'text')",
                        "messages",
                    )
                parts.append({"type": "text", "text": part.text})
            content = parts
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        d["content"] = content if content is not None else ""
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def chat_prompt_ids(
    entry: ModelEntry,
    messages: list[ChatMessage] | None,
    add_generation_prompt: bool = True,
    add_special_tokens: bool = False,
) -> list[int]:
    """Render the chat template and tokenize it; a model without a template is a 400."""
    from gateway.chat_template import ChatTemplateError

    tok = entry.tokenizer
    assert tok is not None
    if not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    try:
        rendered = tok.apply_chat_template(
            message_dicts(messages), add_generation_prompt=add_generation_prompt
        )
    except ChatTemplateError as e:
        raise BadRequest(str(e), "messages") from None
    if isinstance(rendered, str):
        # The template writes BOS itself where the model wants one.
        return list(tok.encode(rendered, add_special_tokens=add_special_tokens))
    return list(rendered)


class ChatRun:
    def __init__(self, client: EngineClient, metrics: Metrics | None, req: ChatCompletionRequest):
        if req.tools and req.tool_choice != "none":
            raise BadRequest("tool calling is not supported", "tools")
        if req.response_format is not None and req.response_format.type != "text":
            raise BadRequest("only response_format type 'text' is supported", "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequest("top_logprobs needs logprobs set to true", "top_logprobs")
        self.req = req
        self.metrics = metrics
        self.entry = entry = client.model(req.model)
        tok = entry.tokenizer
        assert tok is not None
        self.prompt_ids = chat_prompt_ids(
            entry, req.messages, req.add_generation_prompt, req.add_special_tokens
        )
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = build_params(req, max_tokens, logprobs, entry.info.max_logprobs)
        params = check_length(len(self.prompt_ids), params, entry.info.max_model_len, "messages")
        self.request_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.strings: TokenStrings = token_strings(entry)
        children = []
        self.seqs = []
        for i, p in enumerate(fan_out(params)):
            children.append(Child(f"{self.request_id}-{i}", self.prompt_ids, p))
            self.seqs.append(SequenceState(tok, self.prompt_ids, p))
        self.sub: Submission = client.submit(entry.name, children)

    def usage(self) -> Usage:
        completion = sum(s.num_tokens for s in self.seqs)
        return Usage(len(self.prompt_ids), completion, len(self.prompt_ids) + completion)

    def logprobs(self, lps: list[TokenLogprobs], token_ids: list[int]) -> ChoiceLogprobs | None:
        if not self.req.logprobs:
            return None
        s = self.strings
        content = []
        for tid, lp in zip(token_ids, lps, strict=False):
            text = s(tid)
            top = [
                TopLogprob(s(t), v, list(s(t).encode()))
                for t, v in zip(lp.token_ids[1:], lp.logprobs[1:], strict=False)
            ]
            content.append(ChatLogprob(text, lp.logprobs[0], list(text.encode()), top))
        return ChoiceLogprobs(content)


async def create_chat_completion(
    client: EngineClient, metrics: Metrics | None, req: ChatCompletionRequest
) -> ChatCompletionResponse | AsyncGenerator[bytes, None]:
    run = ChatRun(client, metrics, req)
    if req.stream:
        return _stream(run)
    try:
        return await _collect(run)
    finally:
        observe_aborted(run.metrics, run.entry.name, run.seqs)
        run.sub.close()


async def _collect(run: ChatRun) -> ChatCompletionResponse:
    async for _ in sequence_updates(run.sub, run.seqs):
        pass  # the sequences accumulate their text and logprobs
    observe_all(run.metrics, run.entry.name, run.seqs)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=seq.text),
            logprobs=run.logprobs(seq.logprobs, _ids(seq)),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        for i, seq in enumerate(run.seqs)
    ]
    return ChatCompletionResponse(run.request_id, run.created, run.entry.name, choices, run.usage())


def _ids(seq: SequenceState) -> list[int]:
    # Logprobs are kept per token; their chosen ids are the tokens themselves.
    return [lp.token_ids[0] for lp in seq.logprobs]


async def _stream(run: ChatRun) -> AsyncGenerator[bytes, None]:
    name = run.entry.name
    rid, created = run.request_id, run.created

    def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> bytes:
        return event(ChatCompletionChunk(rid, created, name, choices, usage))

    try:
        yield b"".join(
            chunk([ChatStreamChoice(i, DeltaMessage(role="assistant", content=""))])
            for i in range(len(run.seqs))
        )
        async for updates in sequence_updates(run.sub, run.seqs):
            events: list[bytes] = []
            for index, d in updates:
                if not (d.text or d.finished):
                    continue
                seq = run.seqs[index]
                choice = ChatStreamChoice(
                    index,
                    DeltaMessage(content=d.text),
                    logprobs=run.logprobs(d.logprobs, d.token_ids) if d.logprobs else None,
                    finish_reason=seq.finish_reason if d.finished else None,
                    stop_reason=seq.stop_reason if d.finished else None,
                )
                events.append(chunk([choice]))
            if events:
                yield b"".join(events)
        observe_all(run.metrics, name, run.seqs)
        opts = run.req.stream_options
        if opts is not None and opts.include_usage:
            yield chunk([], run.usage())
        yield DONE
    except APIError as e:
        yield error_event(e)
        yield DONE
    finally:
        observe_aborted(run.metrics, run.entry.name, run.seqs)
        run.sub.close()
