"""OpenAI error objects: `{"error": {"message", "type", "param", "code"}}` with a status.

Anything a user can cause is raised as an `APIError` subclass and becomes one of these;
it never becomes a traceback and never disturbs other requests.
"""

from __future__ import annotations

import msgspec


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorInfo


class APIError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorInfo(self.message, self.type, self.param, self.status))


class BadRequest(APIError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class Forbidden(APIError):
    status = 403
    type = "permission_error"


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class TooManyRequests(APIError):
    status = 429
    type = "rate_limit_error"
    retry_after = 1  # seconds, sent as the Retry-After header


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable"


class InternalError(APIError):
    status = 500
    type = "internal_error"


def from_validation_error(e: msgspec.ValidationError | msgspec.DecodeError) -> BadRequest:
    """msgspec says e.g. "Expected `int`, got `str` - at `$.max_tokens`": keep the field."""
    text = str(e)
    param = None
    if " - at `$." in text:
        param = text.rsplit(" - at `$.", 1)[1].rstrip("`").split("[", 1)[0].split(".", 1)[0]
    elif text.startswith("Object missing required field `"):
        param = text.split("`", 2)[1]
    if isinstance(e, msgspec.ValidationError):
        return BadRequest(f"invalid request: {text}", param)
    return BadRequest(f"invalid JSON: {text}")
