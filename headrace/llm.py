"""Offline generation: `LLM(model).generate(prompts, params)`, as vLLM's LLM class.

Runs an EngineCore in process and does the gateway's text work with the gateway's own
pieces: its tokenizer, and its SequenceState for incremental detokenizing and stop strings
(a stop string aborts the request in the engine).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.sampling_params import fan_out
from gateway.sequence import SequenceState
from gateway.tokenizer import Tokenizer, load_tokenizer
from headrace.tp_group import start_engine
from ipc.messages import EngineRequest, RequestOutput, SamplingParams, TokenLogprobs
from worker.config import EngineConfig

Prompt = str | Sequence[int]


@dataclass
class CompletionOutput:
    index: int  # which of the prompt's n completions
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprobs] | None = None
    error: str | None = None


@dataclass
class GenerationResult:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0


class _Pending:
    """One engine request's progress (one of a prompt's n completions)."""

    def __init__(self, result: GenerationResult, index: int, seq: SequenceState) -> None:
        self.result = result
        self.seq = seq
        self.output = CompletionOutput(index=index, text="", token_ids=[], finish_reason=None)

    def update(self, out: RequestOutput) -> None:
        """Apply one engine output the way the gateway does (gateway/sequence.py)."""
        seq, o = self.seq, self.output
        o.token_ids.extend(seq.update(out).token_ids)
        if seq.prompt_logprobs is not None:
            self.result.prompt_logprobs = seq.prompt_logprobs
        self.result.num_cached_tokens = seq.num_cached_tokens
        if seq.finished:
            o.text = seq.text
            o.finish_reason, o.stop_reason, o.error = seq.finish_reason, seq.stop_reason, seq.error
            if seq.params.logprobs is not None:
                o.logprobs = seq.logprobs


class LLM:
    def __init__(self, model: str, **engine_args: Any) -> None:
        engine_args.setdefault("usage_context", "offline")  # vLLM's LLM-class batch defaults
        config = EngineConfig(model=model, **engine_args)
        # tensor_parallel_size=N > 1: this process leads N-1 follower processes.
        self.engine = start_engine(config)
        self.tokenizer: Tokenizer = load_tokenizer(
            config.tokenizer or self.engine.files.tokenizer_path
        )
        self._ids = itertools.count()

    def close(self) -> None:
        """Free the engine's GPU memory (weights, KV cache, CUDA graphs) now; the LLM
        generates no more. `with LLM(...) as llm:` closes it on the way out."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[GenerationResult]:
        """Complete each prompt (text, or a list of token ids). Results keep prompt order."""
        batch: list[Prompt]
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            batch = [prompts]  # type: ignore[list-item]
        else:
            batch = list(prompts)  # type: ignore[arg-type]
        prompts = batch
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        results: list[GenerationResult] = []
        pending: dict[str, _Pending] = {}
        for prompt, p in zip(prompts, params, strict=True):
            p.validate(self.engine.config.max_logprobs)
            if isinstance(prompt, str):
                text: str | None = prompt
                ids = self.tokenizer.encode(prompt)
            else:
                text, ids = None, [int(t) for t in prompt]  # type: ignore[union-attr]
            result = GenerationResult(prompt=text, prompt_token_ids=ids)
            results.append(result)
            for i, child in enumerate(fan_out(p)):
                self._submit(result, i, ids, child, pending)
        self._run(pending, use_tqdm)
        for r in results:
            r.outputs.sort(key=lambda o: o.index)
        return results

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[GenerationResult]:
        """Apply the model's chat template to each conversation and complete it."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(conv) for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    # ---- internals ----------------------------------------------------------------------------
    def _submit(
        self,
        result: GenerationResult,
        index: int,
        ids: list[int],
        p: SamplingParams,
        pending: dict[str, _Pending],
    ) -> None:
        rid = f"llm-{next(self._ids)}"
        entry = _Pending(result, index, SequenceState(self.tokenizer, ids, p))
        result.outputs.append(entry.output)
        error = self.engine.add_request(EngineRequest(rid, ids, p))
        if error is not None:
            raise ValueError(error.error)
        pending[rid] = entry

    def _run(self, pending: dict[str, _Pending], use_tqdm: bool) -> None:
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(pending), desc="generating", unit="req")
        while pending:
            for out in self.engine.step():
                entry = pending.get(out.request_id)
                if entry is None:
                    continue
                entry.update(out)
                if entry.seq.stopped_by_string and out.finish_reason is None:
                    # A stop string matched: the engine need not generate any further.
                    self.engine.abort_requests([out.request_id])
                if entry.seq.finished:
                    del pending[out.request_id]
                    if bar is not None:
                        bar.update(1)
            if pending and not self.engine.has_unfinished_requests():
                raise RuntimeError("engine went idle with requests pending")
        if bar is not None:
            bar.close()
