"""The OpenAI API's request and response bodies, as msgspec Structs.

Requests decode straight from the HTTP body (a wrong type is a 400 naming the field);
unknown fields are ignored, as OpenAI clients send extras. Field names, defaults and
the vLLM extras (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, ...)
follow vLLM's OpenAI server.

Fields accepted but not implemented are refused with a 400 naming them, never silently
dropped: `best_of` != n, `suffix`, `use_beam_search`, `priority` != 0, `bad_words`, a request's
`chat_template`, `structured_outputs.structural_tag`, content parts other than text
(image_url, input_audio, ...). tests/test_openai_compat.py checks each.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

import msgspec
from msgspec import Meta

# OpenAI's ranges, enforced while decoding (a 400 naming the field) and shown in /openapi.json.
Temperature = Annotated[float, Meta(ge=0, le=2)]
ModelName = Annotated[str, Meta(min_length=1)]
C = TypeVar("C")  # a response's choice type

# ------------------------------------------------------------------------- requests


class StreamOptions(msgspec.Struct):
    # vLLM's defaults: naming stream_options at all asks for the usage chunk.
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: str = "text"  # text, json_object, json_schema
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(msgspec.Struct, kw_only=True):
    """vLLM's `structured_outputs` (its current name for the guided_* fields)."""

    json: str | dict[str, Any] | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None  # refused: not supported


class KVCompressionOptions(msgspec.Struct, kw_only=True):
    """`kv_compression` as an object; a plain string is its method alone."""

    method: str  # snapkv, pyramidkv, streaming, or none (off for this request)
    budget: float | None = None  # ratio in (0, 1) of the prompt, or tokens kept per layer
    window: int | None = None  # observation window: the prompt's last `window` queries


class SamplingExtras(msgspec.Struct, kw_only=True):
    """Sampling fields shared by completions and chat, with vLLM's extras."""

    model: ModelName  # required, as OpenAI requires it
    n: int | None = 1  # null means 1 (vLLM and the OpenAI SDKs accept it)
    best_of: int | None = None
    temperature: Temperature | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None  # vLLM's int64
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    echo: bool = False
    prompt_logprobs: int | None = None
    # Structured output (gateway/structured_output.py): OpenAI's, then vLLM's extras.
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | bool | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    return_token_ids: bool | None = None  # vLLM's: token ids alongside the text
    # vLLM's prompt truncation: keep the last k prompt tokens (-1: up to max_model_len).
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1)] | None = None
    # vLLM extras this server does not implement: refused with a 400 when used, so a
    # request never silently behaves differently (sampling_params.check_request_shape).
    use_beam_search: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    priority: int = 0  # vLLM's; anything but 0 is refused, as vLLM refuses it without
    # --scheduling-policy priority
    # headrace's extra: compress this request's KV cache after its prefill (README).
    kv_compression: str | KVCompressionOptions | None = None


class CompletionRequest(SamplingExtras, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of lists of token ids.
    prompt: str | list[str | int | list[int]] | None = None
    max_tokens: int | msgspec.UnsetType | None = msgspec.UNSET  # unset: 16, or the model's
    logprobs: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: the call it answers


class FunctionDefinition(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: str = "function"
    function: FunctionDefinition


class ChatCompletionRequest(SamplingExtras, kw_only=True):
    messages: list[ChatMessage] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None  # none, auto, required, a function
    parallel_tool_calls: bool | None = True
    # Unset: True, unless continue_final_message (vLLM refuses both set true).
    add_generation_prompt: bool | msgspec.UnsetType = msgspec.UNSET
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables
    chat_template: str | None = None  # refused: a request's template is untrusted code
    documents: list[dict[str, str]] | None = None  # vLLM's: a template variable (RAG)
    reasoning_effort: str | None = None  # a template variable too, as vLLM passes it


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool | msgspec.UnsetType = msgspec.UNSET
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


# ------------------------------------------------------------------------- responses


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class PromptLogprob(msgspec.Struct):
    """One entry of vLLM's `prompt_logprobs` (keyed by token id in its dict)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's extra: per prompt token (None for the first) {token id: logprob entry}.
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    # vLLM's `return_token_ids`: this choice's prompt (first chunk only) and its new tokens.
    prompt_token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET


class Completion(msgspec.Struct, Generic[C]):
    """What every completion body and stream chunk carries; subclasses name the choice type
    and set `object` (msgspec keeps the fields in this order, `object` last)."""

    id: str
    created: int
    model: str
    choices: list[C]
    usage: Usage | None = None
    system_fingerprint: str | None = None  # OpenAI's field; vLLM sends null too


class CompletionResponse(Completion[CompletionChoice]):
    object: str = "text_completion"


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(msgspec.Struct):
    content: list[ChatLogprob] | None = None


class AssistantMessage(msgspec.Struct):
    role: str = "assistant"
    content: str | None = None
    # Left out of the body when the reply called no tools, as OpenAI and vLLM leave it.
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET  # vLLM's return_token_ids


class ChatCompletionResponse(Completion[ChatChoice]):
    object: str = "chat.completion"
    # vLLM's extra, with `prompt_logprobs` asked for: per prompt token, as in completions.
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    prompt_token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET  # vLLM's return_token_ids


class DeltaFunctionCall(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(msgspec.Struct, omit_defaults=True):
    """A piece of the index-th tool call: its first piece carries id, type and name."""

    index: int
    id: str | None = None
    type: str | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(msgspec.Struct):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | msgspec.UnsetType = (
        msgspec.UNSET
    )  # vLLM's return_token_ids: this chunk's tokens


class ChatCompletionChunk(Completion[ChatStreamChoice]):
    object: str = "chat.completion.chunk"
    prompt_token_ids: list[int] | msgspec.UnsetType = (
        msgspec.UNSET
    )  # vLLM's return_token_ids: the first chunk's


class ModelCard(msgspec.Struct):
    id: str
    created: int
    root: str
    max_model_len: int
    object: str = "model"
    owned_by: str = "headrace"
    parent: str | None = None  # vLLM's: the base model of an adapter


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class TokenizeResponse(msgspec.Struct, omit_defaults=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(msgspec.Struct):
    prompt: str
