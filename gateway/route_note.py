"""What the HTTP layer and the router tell each other about one API call.

The HTTP layer knows the session key (an `X-Session-ID` header, else the body's OpenAI
`user` field) and wants back the ids of the workers that served the call, for the
`X-Headrace-Worker` response header. The serving modules between them (chat, completions)
need neither, so the note travels in a context variable: `EngineClient.submit` reads the
session from it and writes the chosen workers into it. A task started inside `noting()`
(the call's own work, under `until_disconnect`) sees the same note object.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

SESSION_HEADER = "x-session-id"
WORKER_HEADER = "X-Headrace-Worker"
MAX_SESSION_KEY = 256  # characters; longer keys are cut (they only feed a hash)


@dataclass
class RouteNote:
    session: str | None = None  # the session key, or None for least-loaded routing
    worker_ids: list[str] = field(default_factory=list)  # who served it, in routing order

    def served_by(self, worker_id: str | None) -> None:
        if worker_id and worker_id not in self.worker_ids:
            self.worker_ids.append(worker_id)

    def headers(self) -> dict[str, str]:
        if not self.worker_ids:
            return {}
        value = ", ".join(self.worker_ids)
        # Worker ids come from --worker-id: keep the header printable ASCII whatever they are.
        return {WORKER_HEADER: "".join(c if " " <= c <= "~" else "?" for c in value)}


_current: ContextVar[RouteNote | None] = ContextVar("headrace_route_note", default=None)


def session_key(header: str | None, user: str | None) -> str | None:
    """The header wins over the body's `user`; empty values mean no session."""
    key = (header or "").strip() or (user or "")
    return key[:MAX_SESSION_KEY] or None


@contextlib.contextmanager
def noting(note: RouteNote) -> Iterator[RouteNote]:
    token = _current.set(note)
    try:
        yield note
    finally:
        _current.reset(token)


def current_note() -> RouteNote | None:
    return _current.get()
