"""OpenAI request fields -> the worker's SamplingParams, with OpenAI-style 400s."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from gateway.errors import BadRequest
from gateway.protocol import KVCompressionOptions, SamplingExtras
from ipc.messages import GuidedDecoding, KVCompression, SamplingParams
from ipc.sampling import ParamError, resolve_max_tokens, validate_params


def check_request_shape(req: SamplingExtras, vocab_size: int) -> None:
    """The cross-field rules vLLM's request models enforce, before any sampling param."""
    if req.stream_options is not None and not req.stream:
        raise BadRequest("Stream options can only be defined when `stream=True`.", "stream_options")
    for name in ("use_beam_search", "bad_words"):
        if getattr(req, name):
            raise BadRequest(f"{name} is not supported by this server", name)
    if req.priority != 0:
        raise BadRequest("priority scheduling is not enabled on this server", "priority")
    n = req.n if req.n is not None else 1
    if req.best_of is not None and req.best_of != n:
        raise BadRequest("best_of must equal n: best-of sampling is not supported", "best_of")
    if req.logit_bias:
        check_logit_bias(req.logit_bias, vocab_size)
    if req.allowed_token_ids is not None:
        ids = req.allowed_token_ids
        if not ids:
            raise BadRequest("allowed_token_ids must not be empty", "allowed_token_ids")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise BadRequest(
                f"allowed_token_ids token id {bad} is out of vocabulary (vocab size {vocab_size})",
                "allowed_token_ids",
            )


def check_logit_bias(bias: Mapping[str, float], vocab_size: int) -> None:
    """OpenAI's logit_bias: token ids (as strings) -> a bias in [-100, 100]."""
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise BadRequest(
                f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                "logit_bias",
            ) from None
        if not 0 <= token_id < vocab_size:
            raise BadRequest(
                f"logit_bias token id {token_id} is out of vocabulary (vocab size {vocab_size})",
                "logit_bias",
            )
        if not -100 <= value <= 100:
            raise BadRequest(
                f"logit_bias values must be in [-100, 100], got {value!r} for {key!r}",
                "logit_bias",
            )


def build_params(
    req: SamplingExtras,
    max_tokens: int | None,
    logprobs: int | None,
    max_logprobs: int,
    guided: GuidedDecoding | None = None,
    defaults: Mapping[str, float] | None = None,
) -> SamplingParams:
    """Validated params for one prompt's n completions (n is fanned out by `fan_out`).

    `defaults` (the model's generation_config.json, ModelInfo.sampling_defaults) fill the
    fields the request leaves unset, as vLLM's `--generation-config auto` does. Callers
    run `check_request_shape` first.
    """
    d = defaults or {}

    def pick(value: float | None, name: str, fallback: float) -> float:
        return value if value is not None else d.get(name, fallback)

    if max_tokens is None and "max_tokens" in d:
        max_tokens = int(d["max_tokens"])
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    params = SamplingParams(
        n=req.n if req.n is not None else 1,
        temperature=pick(req.temperature, "temperature", 1.0),
        top_p=pick(req.top_p, "top_p", 1.0),
        top_k=int(pick(req.top_k, "top_k", 0)),
        min_p=pick(req.min_p, "min_p", 0.0),
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=pick(req.repetition_penalty, "repetition_penalty", 1.0),
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=req.prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        guided=guided,
        logit_bias=(
            {int(k): float(v) for k, v in req.logit_bias.items()} if req.logit_bias else None
        ),
        allowed_token_ids=list(req.allowed_token_ids) if req.allowed_token_ids else None,
        kv_compression=kv_compression_params(req.kv_compression),
    )
    try:
        validate_params(params, max_logprobs)
    except ParamError as e:
        raise BadRequest(str(e), e.field) from None
    return params


def kv_compression_params(body: str | KVCompressionOptions | None) -> KVCompression | None:
    """The body's `kv_compression` (a method name, or an object) as the worker's params."""
    if body is None:
        return None
    if isinstance(body, str):
        return KVCompression(body)
    return KVCompression(body.method, body.budget or 0.0, body.window or 0)


def truncate_prompt(ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (-1: max_model_len)."""
    if keep is None:
        return ids
    if keep == -1:
        keep = max_model_len
    if keep > max_model_len:
        raise BadRequest(
            f"truncate_prompt_tokens ({keep}) cannot be greater than max_model_len "
            f"({max_model_len}). Please select a smaller truncation size.",
            "truncate_prompt_tokens",
        )
    return ids[-keep:] if keep else []


def check_length(
    prompt_len: int, params: SamplingParams, max_model_len: int, what: str = "prompt"
) -> SamplingParams:
    """Fill max_tokens when unset; 400 when the prompt plus completion cannot fit."""
    try:
        return resolve_max_tokens(prompt_len, params, max_model_len, what)
    except ParamError as e:
        raise BadRequest(str(e), e.field) from None


def fan_out(params: SamplingParams) -> list[SamplingParams]:
    """n requests of n=1; with a seed, child i gets seed + i so the n samples differ."""
    if params.n == 1:
        return [params]
    children = []
    for i in range(params.n):
        seed = None if params.seed is None else params.seed + i
        children.append(msgspec.structs.replace(params, n=1, seed=seed))
    return children
