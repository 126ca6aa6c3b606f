"""POST /v1/chat/completions: messages -> the model's chat template -> n completions.

Streaming follows OpenAI: each choice's first chunk carries `delta.role`, then content
deltas, and the chunk that finishes a choice carries its `finish_reason`; with
`stream_options.include_usage` a last chunk has empty `choices` and the usage.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from gateway.decode import offload
from gateway.engine_client import EngineClient, ModelEntry
from gateway.errors import BadRequest
from gateway.inflight import Child, Submission
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
    StreamOptions,
    ToolCall,
    TopLogprob,
    Usage,
)
from gateway.sampling_params import build_params, check_length, fan_out
from gateway.sequence import Delta, SequenceState, TokenStrings
from gateway.serving_common import serve, token_strings
from gateway.sse import event
from gateway.structured_output import checked_guided_decoding
from gateway.tool_calling import ToolOptions, ToolPlan, plan_tools
from gateway.tool_parsers import ToolCallStream, parse_complete
from ipc.messages import GuidedDecoding, TokenLogprobs


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant", "developer", "tool"):
            raise BadRequest(f"messages[{i}].role {m.role!r} is not supported", "messages")
        content: Any = m.content
        if content is None and m.role in ("user", "system", "developer"):
            raise BadRequest(f"messages[{i}].content is required for role {m.role!r}", "messages")
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
        if m.tool_calls:
            d["tool_calls"] = [_call_dict(c) for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _call_dict(call: ToolCall) -> dict[str, Any]:
    # Templates write `arguments | tojson`: they want the object, not its JSON text.
    try:
        arguments: Any = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        arguments = call.function.arguments
    fn = {"name": call.function.name, "arguments": arguments}
    return {"id": call.id, "type": call.type, "function": fn}


def chat_prompt_ids(
    entry: ModelEntry,
    messages: list[ChatMessage] | None,
    add_generation_prompt: bool = True,
    add_special_tokens: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Render the chat template and tokenize it; a model without a template is a 400."""
    from gateway.chat_template import ChatTemplateError

    tok = entry.tokenizer
    assert tok is not None
    if not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    try:
        return tok.encode_chat(
            message_dicts(messages),
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            add_special_tokens=add_special_tokens,
        )
    except ChatTemplateError as e:
        raise BadRequest(str(e), "messages") from None


def chat_chars(messages: list[ChatMessage] | None) -> int:
    total = 0
    for m in messages or []:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content:
            total += sum(len(p.text or "") for p in m.content)
    return total


class ChatRun:
    def __init__(
        self,
        client: EngineClient,
        metrics: Metrics | None,
        req: ChatCompletionRequest,
        prompt_ids: list[int],  # rendered and tokenized already (chat_prompt_ids)
        tools: ToolPlan | None = None,
        guided: GuidedDecoding | None = None,
    ):
        self.tools = tools or ToolPlan()
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequest("top_logprobs needs logprobs set to true", "top_logprobs")
        self.req = req
        self.metrics = metrics
        self.entry = entry = client.model(req.model)
        tok = entry.tokenizer
        assert tok is not None
        self.prompt_ids = prompt_ids
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        info = entry.info
        params = build_params(
            req, max_tokens, logprobs, info.max_logprobs, guided, info.sampling_defaults
        )
        params = check_length(len(self.prompt_ids), params, entry.info.max_model_len, "messages")
        self.request_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.strings: TokenStrings = token_strings(entry)
        children = []
        self.seqs = []
        for i, p in enumerate(fan_out(params)):
            children.append(Child(f"{self.request_id}-{i}", self.prompt_ids, p))
            self.seqs.append(SequenceState(tok, self.prompt_ids, p))
        extract = self.tools.extract
        # Streaming with tools: each choice's calls are a diff of successive extractions.
        self.call_streams = [ToolCallStream(extract) if extract else None for _ in self.seqs]
        self.sub: Submission = client.submit(entry.name, children)

    def usage(self) -> Usage:
        completion = sum(s.num_tokens for s in self.seqs)
        return Usage(len(self.prompt_ids), completion, len(self.prompt_ids) + completion)

    @property
    def stream(self) -> bool:
        return self.req.stream

    @property
    def stream_options(self) -> StreamOptions | None:
        return self.req.stream_options

    def _chunk(self, choices: list[ChatStreamChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(self.request_id, self.created, self.entry.name, choices, usage)
        return event(chunk)

    def head(self) -> bytes:
        # Each choice's first chunk carries the role.
        return b"".join(
            self._chunk([ChatStreamChoice(i, DeltaMessage(role="assistant", content=""))])
            for i in range(len(self.seqs))
        )

    def events(self, updates: list[tuple[int, Delta]]) -> list[bytes]:
        events: list[bytes] = []
        for index, d in updates:
            if not d.worth_sending(self.req.logprobs):
                continue
            seq, stream = self.seqs[index], self.call_streams[index]
            delta = DeltaMessage(content=d.text)
            finish = seq.finish_reason if d.finished else None
            if stream is not None:
                content, calls = stream.feed(d.text, final=d.finished)
                delta = DeltaMessage(content=content or None, tool_calls=calls or None)
                finish = _tool_finish(finish, stream.called)
                if not (content or calls or d.finished or d.logprobs):
                    continue
            choice = ChatStreamChoice(
                index,
                delta,
                logprobs=self.logprobs(d.logprobs, d.token_ids) if d.logprobs else None,
                finish_reason=finish,
                stop_reason=seq.stop_reason if d.finished else None,
            )
            events.append(self._chunk([choice]))
        return events

    def usage_event(self) -> bytes:
        return self._chunk([], self.usage())

    def response(self, deltas: list[Delta]) -> ChatCompletionResponse:
        # The sequences hold their whole text and logprobs; the deltas are not needed.
        choices = []
        for i, seq in enumerate(self.seqs):
            message = AssistantMessage(content=seq.text)
            finish = seq.finish_reason
            if self.tools.extract is not None:
                content, calls = parse_complete(self.tools.extract, seq.text)
                message = AssistantMessage(content=content, tool_calls=calls)
                finish = _tool_finish(finish, bool(calls))
            logprobs = self.logprobs(seq.logprobs, _ids(seq))
            choices.append(ChatChoice(i, message, logprobs, finish, seq.stop_reason))
        return ChatCompletionResponse(
            self.request_id, self.created, self.entry.name, choices, self.usage()
        )

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
    client: EngineClient,
    metrics: Metrics | None,
    req: ChatCompletionRequest,
    tool_options: ToolOptions | None = None,
) -> ChatCompletionResponse | AsyncGenerator[bytes, None]:
    tools = plan_tools(req, tool_options or ToolOptions())
    guided = await checked_guided_decoding(req, tools.guided)
    # Long chats are rendered and tokenized in a thread, so other streams keep flowing.
    args = (client.model(req.model), req.messages, req.add_generation_prompt)
    size = chat_chars(req.messages)
    ids = await offload(size, chat_prompt_ids, *args, req.add_special_tokens, tools.template_tools)
    result: ChatCompletionResponse | AsyncGenerator[bytes, None] = await serve(
        ChatRun(client, metrics, req, ids, tools, guided)
    )
    return result


def _tool_finish(finish: str | None, called: bool) -> str | None:
    """OpenAI ends a turn that called tools with finish_reason "tool_calls"."""
    return "tool_calls" if called and finish == "stop" else finish


def _ids(seq: SequenceState) -> list[int]:
    # Logprobs are kept per token; their chosen ids are the tokens themselves.
    return [lp.token_ids[0] for lp in seq.logprobs]
