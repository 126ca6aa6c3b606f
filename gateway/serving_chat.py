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

import msgspec

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
from gateway.sampling_params import (
    build_params,
    check_length,
    check_request_shape,
    fan_out,
    truncate_prompt,
)
from gateway.sequence import Delta, SequenceState, TokenStrings
from gateway.serving_common import serve, token_strings
from gateway.serving_completions import prompt_logprobs
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


# Template variables a request's chat_template_kwargs may not replace: the server sets them.
_RESERVED = frozenset(
    {"messages", "add_generation_prompt", "tools", "continue_final_message", "chat_template"}
)


def chat_prompt_ids(
    entry: ModelEntry,
    messages: list[ChatMessage] | None,
    add_generation_prompt: bool = True,
    add_special_tokens: bool = False,
    tools: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Render the chat template and tokenize it; a model without a template is a 400."""
    from gateway.chat_template import ChatTemplateError

    tok = entry.tokenizer
    assert tok is not None
    if not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    extra = {k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED}
    try:
        return tok.encode_chat(
            message_dicts(messages),
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            add_special_tokens=add_special_tokens,
            continue_final_message=continue_final_message,
            **extra,
        )
    except ChatTemplateError as e:
        raise BadRequest(str(e), "messages") from None


def generation_prompt(add: bool | msgspec.UnsetType, continue_final: bool) -> bool:
    """vLLM's rule: continue_final_message turns the generation prompt off, and both
    asked for at once is a 400."""
    if continue_final and add is True:
        raise BadRequest(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            "continue_final_message",
        )
    return not continue_final if add is msgspec.UNSET else bool(add)


def message_text(m: ChatMessage) -> str:
    if isinstance(m.content, list):
        return "\n".join(p.text or "" for p in m.content)
    return m.content or ""


def chat_chars(messages: list[ChatMessage] | None) -> int:
    total = 0
    for m in messages or []:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content:
            total += sum(len(p.text or "") for p in m.content)
    return total


def chat_logprobs_setting(req: ChatCompletionRequest, max_logprobs: int) -> int | None:
    """top logprobs per token, or None without logprobs; vLLM's rules and messages."""
    top = req.top_logprobs
    if top is not None and not 0 <= top <= max_logprobs:
        raise BadRequest(f"top_logprobs must be in [0, {max_logprobs}], got {top}", "top_logprobs")
    if top and not req.logprobs:
        raise BadRequest(
            "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs"
        )
    return (top or 0) if req.logprobs else None


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
        self.req = req
        self.metrics = metrics
        self.entry = entry = client.model(req.model)
        tok = entry.tokenizer
        assert tok is not None
        info = entry.info
        check_request_shape(req, info.vocab_size)
        logprobs = chat_logprobs_setting(req, info.max_logprobs)
        self.prompt_ids = prompt_ids = truncate_prompt(
            prompt_ids, req.truncate_prompt_tokens, info.max_model_len
        )
        if req.prompt_logprobs is not None and req.stream:
            raise BadRequest(
                "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs"
            )
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        try:
            params = build_params(
                req, max_tokens, logprobs, info.max_logprobs, guided, info.sampling_defaults
            )
            params = check_length(len(prompt_ids), params, info.max_model_len, "messages")
        except BadRequest as e:
            if e.param == "max_tokens" and req.max_completion_tokens is not None:
                e.param = "max_completion_tokens"  # name the field the client sent
            raise
        self.request_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.strings: TokenStrings = token_strings(entry)
        # vLLM's `echo`: the reply starts with the last message when it is the assistant's.
        last = req.messages[-1] if req.messages else None
        self.echo = message_text(last) if req.echo and last and last.role == "assistant" else ""
        opts = req.stream_options
        self.continuous = bool(opts and opts.include_usage and opts.continuous_usage_stats)
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
        return bool(self.req.stream)

    @property
    def stream_options(self) -> StreamOptions | None:
        return self.req.stream_options

    def _chunk(
        self,
        choices: list[ChatStreamChoice],
        usage: Usage | None = None,
        prompt_ids: list[int] | None = None,
    ) -> bytes:
        if usage is None and self.continuous and len(choices) == 1:
            # continuous_usage_stats: each chunk carries its choice's counts so far.
            done = self.seqs[choices[0].index].num_tokens
            usage = Usage(len(self.prompt_ids), done, len(self.prompt_ids) + done)
        chunk = ChatCompletionChunk(self.request_id, self.created, self.entry.name, choices, usage)
        if prompt_ids is not None:
            chunk.prompt_token_ids = prompt_ids
        return event(chunk)

    def head(self) -> bytes:
        # Each choice's first chunk carries the role; with echo, the next one the echo.
        # With return_token_ids, the prompt's ids ride on the first chunk.
        ids = self.prompt_ids if self.req.return_token_ids else None
        chunks = [
            self._chunk(
                [ChatStreamChoice(i, DeltaMessage(role="assistant", content=""))],
                prompt_ids=ids if i == 0 else None,
            )
            for i in range(len(self.seqs))
        ]
        if self.echo:
            chunks += [
                self._chunk([ChatStreamChoice(i, DeltaMessage(content=self.echo))])
                for i in range(len(self.seqs))
            ]
        return b"".join(chunks)

    def events(self, updates: list[tuple[int, Delta]]) -> list[bytes]:
        events: list[bytes] = []
        for index, d in updates:
            if not d.worth_sending(bool(self.req.logprobs)):
                continue
            seq, stream = self.seqs[index], self.call_streams[index]
            delta = DeltaMessage(content=d.text)
            finish = seq.finish_reason if d.finished else None
            if stream is not None:
                content, calls = stream.feed(d.text, final=d.finished)
                delta = DeltaMessage(content=content or None, tool_calls=calls or None)
                finish = self._tool_finish(finish, stream.called)
                if not (content or calls or d.finished or d.logprobs):
                    continue
            choice = ChatStreamChoice(
                index,
                delta,
                logprobs=self.logprobs(d.logprobs, d.token_ids) if d.logprobs else None,
                finish_reason=finish,
                stop_reason=seq.stop_reason if d.finished else None,
            )
            if self.req.return_token_ids:
                choice.token_ids = d.token_ids
            events.append(self._chunk([choice]))
        return events

    def usage_event(self) -> bytes:
        return self._chunk([], self.usage())

    def response(self, deltas: list[Delta]) -> ChatCompletionResponse:
        # The sequences hold their whole text and logprobs; the deltas are not needed.
        choices = []
        for i, seq in enumerate(self.seqs):
            message = AssistantMessage(content=self.echo + seq.text)
            finish = seq.finish_reason
            if self.tools.extract is not None:
                content, calls = parse_complete(self.tools.extract, seq.text)
                message = AssistantMessage(content=content, tool_calls=calls or msgspec.UNSET)
                finish = self._tool_finish(finish, bool(calls))
            logprobs = self.logprobs(seq.logprobs, _ids(seq))
            choice = ChatChoice(i, message, logprobs, finish, seq.stop_reason)
            if self.req.return_token_ids:
                choice.token_ids = deltas[i].token_ids
            choices.append(choice)
        response = ChatCompletionResponse(
            self.request_id, self.created, self.entry.name, choices, self.usage()
        )
        response.prompt_logprobs = prompt_logprobs(self.seqs[0], self.strings)
        if self.req.return_token_ids:
            response.prompt_token_ids = self.prompt_ids
        return response

    def _tool_finish(self, finish: str | None, called: bool) -> str | None:
        """OpenAI ends a turn that called tools with finish_reason "tool_calls", when the
        model chose to (auto, required); a named tool_choice ends in "stop", as in OpenAI
        and vLLM."""
        return "tool_calls" if called and finish == "stop" and not self.tools.named else finish

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
    if req.chat_template is not None:
        raise BadRequest(
            "chat_template in a request is not supported: the server renders the model's own "
            "template (a request's template would be untrusted code)",
            "chat_template",
        )
    tools = plan_tools(req, tool_options or ToolOptions())
    guided = await checked_guided_decoding(req, tools.guided)
    add = generation_prompt(req.add_generation_prompt, req.continue_final_message)
    # Long chats are rendered and tokenized in a thread, so other streams keep flowing.
    args = (client.model(req.model), req.messages, add, req.add_special_tokens)
    variables = dict(req.chat_template_kwargs or {})
    for name in ("documents", "reasoning_effort"):  # vLLM's template variables
        if getattr(req, name) is not None:
            variables[name] = getattr(req, name)
    extra = (tools.template_tools, req.continue_final_message, variables)
    ids = await offload(chat_chars(req.messages), chat_prompt_ids, *args, *extra)
    result: ChatCompletionResponse | AsyncGenerator[bytes, None] = await serve(
        ChatRun(client, metrics, req, ids, tools, guided)
    )
    return result


def _ids(seq: SequenceState) -> list[int]:
    # Logprobs are kept per token; their chosen ids are the tokens themselves.
    return [lp.token_ids[0] for lp in seq.logprobs]
