"""Errors the worker process treats specially (no torch here: worker/server.py imports it)."""


class FatalEngineError(RuntimeError):
    """The engine cannot go on (a tensor-parallel follower died, the group fell out of
    step): the worker fails the requests in flight with this message and exits, so that its
    supervisor (`headrace serve`) restarts the whole group."""
