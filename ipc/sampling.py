"""Sampling params checked against a prompt and a model, the same way on both sides.

The gateway calls `check_request` to answer a client with a 400 before anything is sent;
the worker calls it again on admission (a worker may serve other callers, and it must not
trust its inputs). `max_tokens` is resolved here, once: None becomes what is left of the
model's context, and the resolved params travel with the request from then on.
"""

from __future__ import annotations

import msgspec

from ipc.messages import SamplingParams


class ParamError(ValueError):
    """A sampling param or prompt a client got wrong; `field` names it (OpenAI's `param`)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def validate_params(params: SamplingParams, max_logprobs: int) -> None:
    """SamplingParams.validate, raising ParamError naming the field."""
    try:
        params.validate(max_logprobs)
    except ValueError as e:
        raise ParamError(str(e), str(e).split(" ", 1)[0]) from None


def resolve_max_tokens(
    prompt_len: int, params: SamplingParams, max_model_len: int, what: str = "prompt"
) -> SamplingParams:
    """`params` with max_tokens filled when unset; ParamError when the prompt (called
    `what` in messages) plus the completion cannot fit in the model's context."""
    if prompt_len == 0:
        raise ParamError(f"the {what} is empty", what)
    if prompt_len >= max_model_len:
        raise ParamError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"{what} has {prompt_len} tokens, leaving no room for the completion. Please "
            f"reduce the length of the {what}.",
            what,
        )
    if params.max_tokens is None:
        return msgspec.structs.replace(params, max_tokens=max_model_len - prompt_len)
    if prompt_len + params.max_tokens > max_model_len:
        raise ParamError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + params.max_tokens} tokens ({prompt_len} in the {what}, "
            f"{params.max_tokens} in the completion). Please reduce the length of the {what} "
            "or completion.",
            "max_tokens",
        )
    return params


def check_request(
    prompt: list[int],
    params: SamplingParams,
    vocab_size: int,
    max_model_len: int,
    max_logprobs: int,
    what: str = "prompt",
) -> SamplingParams:
    """Validate a request against the model; returns its params with max_tokens resolved."""
    validate_params(params, max_logprobs)
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ParamError(f"{what} token id {bad} is out of range for vocab size {vocab_size}", what)
    for name, ids in (
        ("logit_bias", list(params.logit_bias or ())),
        ("allowed_token_ids", params.allowed_token_ids or []),
    ):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ParamError(f"{name} token id {bad} is out of vocabulary ({vocab_size})", name)
    return resolve_max_tokens(len(prompt), params, max_model_len, what)
