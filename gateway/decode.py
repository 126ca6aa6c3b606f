"""HTTP body -> request Struct, off the event loop when the body is large.

Anything that is not a valid request becomes a 400 naming the field where msgspec says
which: malformed JSON, bad UTF-8, wrong types, out-of-range values, and JSON nested so
deeply that the decoder runs out of stack (a RecursionError, which would otherwise be a 500).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from gateway.errors import BadRequest, from_validation_error

T = TypeVar("T")

# Bodies (and prompt texts) past this size are decoded / tokenized in a thread: a few
# milliseconds of CPU at most stay on the event loop, so other streams keep flowing.
OFFLOAD_BYTES = 64 << 10


def decode(body: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise from_validation_error(e) from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None


async def decode_body(body: bytes, kind: type[T]) -> T:
    if len(body) < OFFLOAD_BYTES:
        return decode(body, kind)
    return await asyncio.to_thread(decode, body, kind)


async def offload(size: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, in a thread when `size` (bytes or characters of input) is large."""
    if size < OFFLOAD_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)
