"""In-process serving: the completions and chat handlers against a scripted engine client.

`ScriptedClient` stands in for gateway.engine_client.EngineClient: every child of a
submission produces the tokens `script(child)` gives, one token per engine step (or in
groups, as speculative steps do), with placeholder logprobs and prompt logprobs when asked.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

from gateway.engine_client import ModelEntry
from gateway.inflight import Child
from gateway.tokenizer import Tokenizer
from ipc.messages import FinishReason, ModelInfo, RequestOutput, TokenLogprobs

MODEL = "m"


def logprobs_of(token_id: int, top: int, vocab: int) -> TokenLogprobs:
    """Distinct values per token, so a misplaced entry shows."""
    others = [(token_id + k) % vocab for k in range(1, top + 1)]
    return TokenLogprobs([token_id, *others], [-(token_id % 97) / 10 - 0.01] + [-30.0] * top, 2)


class ScriptedSubmission:
    """Yields prepared batches of (child index, output); records aborts and closes."""

    def __init__(self, batches: list[list[tuple[int, RequestOutput]]]) -> None:
        self.batches = batches
        self.aborted: list[int] = []
        self.closed = False

    def __aiter__(self) -> ScriptedSubmission:
        return self

    async def __anext__(self) -> list[tuple[int, RequestOutput]]:
        if not self.batches:
            raise StopAsyncIteration
        return self.batches.pop(0)

    def abort(self, index: int) -> None:
        self.aborted.append(index)

    def close(self) -> None:
        self.closed = True


class ScriptedClient:
    def __init__(
        self,
        tok: Tokenizer,
        script: Callable[[Child], list[int]],
        group: int = 1,
        finish: FinishReason = FinishReason.LENGTH,
    ) -> None:
        info = ModelInfo(MODEL, "/nowhere", 4096, tok.vocab_size, "w0")
        self.entry = ModelEntry(MODEL, info, tokenizer=tok)
        self.script = script
        self.group = group  # tokens per engine step
        self.finish = finish

    def model(self, name: str | None) -> ModelEntry:
        return self.entry

    def submit(self, model: str, children: list[Child]) -> ScriptedSubmission:
        vocab = self.entry.info.vocab_size
        per_child: list[list[RequestOutput]] = []
        for child in children:
            p = child.params
            tokens = self.script(child)
            outs = []
            for start in range(0, len(tokens), self.group):
                ids = tokens[start : start + self.group]
                out = RequestOutput(child.request_id, ids)
                if p.logprobs is not None:
                    out.new_logprobs = [logprobs_of(t, p.logprobs, vocab) for t in ids]
                if start == 0 and p.prompt_logprobs is not None:
                    out.prompt_logprobs = [None] + [
                        logprobs_of(t, p.prompt_logprobs, vocab) for t in child.prompt_token_ids[1:]
                    ]
                outs.append(out)
            outs[-1].finish_reason = self.finish
            per_child.append(outs)
        batches = []
        for step in range(max(len(o) for o in per_child)):
            batches.append([(i, o[step]) for i, o in enumerate(per_child) if step < len(o)])
        return ScriptedSubmission(batches)


def call(handler: Callable[..., Any], client: ScriptedClient, req: Any) -> Any:
    """Run a serving handler; a streamed answer comes back as its list of SSE payloads."""

    async def run() -> Any:
        res = await handler(client, None, req)
        if not isinstance(res, AsyncGenerator):
            return res
        events: list[Any] = []
        async for chunk in res:
            for line in chunk.decode().splitlines():
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    events.append(data if data == "[DONE]" else json.loads(data))
        return events

    return asyncio.run(run())
