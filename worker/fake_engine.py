"""A model-free engine for benchmarking the gateway and the IPC path: `headrace worker
--fake-engine`.

FakeEngineCore has EngineCore's interface (add_request / abort_requests / step(_with_owners)
/ has_unfinished_requests / owner_of / request_ids / stats / model_info) but runs no model.
Each step admits waiting requests up to `max_num_seqs`, waits until `step_s` seconds after
the previous step began (a stand-in for GPU time, spent sleeping: the step rate is 1/step_s
whatever the worker's own CPU time, as long as that fits) and gives every running request
one token. Tokens are deterministic: every request's k-th token is the k-th token (cycling)
of a fixed English text in the model folder's tokenizer, so the gateway detokenizes
realistic text. Requests end at max_tokens (finish_reason `length`) or on one of their
stop_token_ids; EOS is never produced. Logprobs, when asked for, are placeholders (the
chosen token at 0.0, alternatives at -20.0).

It exists so a benchmark can drive one gateway with a worker that is never the bottleneck
(see scripts/bench_gateway.py); nothing in the serving path uses it unless asked to.

`model` only needs a tokenizer: a folder with tokenizer.json (e.g. ../shared/models/
llama3-tokenizer) or a model folder. The vocabulary size comes from the tokenizer; the
context length from `max_model_len`, else config.json's max_position_embeddings, else 8192.
"""

from __future__ import annotations

import collections
import json
import os
import time

from ipc.messages import (
    EngineRequest,
    FinishReason,
    ModelInfo,
    RequestOutput,
    TokenLogprobs,
    WorkerStats,
)
from ipc.sampling import check_request
from worker.config import EngineConfig
from worker.generation_defaults import read_generation_config, sampling_defaults

DEFAULT_MAX_MODEL_LEN = 8192
TEXT = (
    "The mill stood by the river, and a channel of cold water ran from the weir to its "
    "wheel. Every morning the miller opened the gate, the water rushed through the "
    "headrace, and the stones began to turn. Farmers brought grain from the valley; "
    "children watched the wheel spin and counted the buckets as they rose and fell. "
)


class _FakeRequest:
    __slots__ = (
        "generated",
        "id",
        "logprobs",
        "max_tokens",
        "min_tokens",
        "num_prompt",
        "owner",
        "prompt",
        "prompt_logprobs",
        "stop_ids",
    )

    def __init__(self, req: EngineRequest, max_tokens: int, owner: bytes) -> None:
        p = req.params
        self.id = req.request_id
        self.owner = owner
        self.prompt = req.prompt_token_ids
        self.num_prompt = len(req.prompt_token_ids)
        self.max_tokens = max_tokens
        self.stop_ids = frozenset(p.stop_token_ids)
        self.min_tokens = p.min_tokens
        self.logprobs = p.logprobs
        self.prompt_logprobs = p.prompt_logprobs
        self.generated = 0


class FakeEngineCore:
    """EngineCore's interface with no model: one deterministic token per running request
    per step, steps starting `step_s` seconds apart (sleeping, like a GPU wait)."""

    def __init__(self, config: EngineConfig, step_s: float = 0.0) -> None:
        config.validate()
        if step_s < 0:
            raise ValueError(f"the fake engine's step time must be >= 0, got {step_s}")
        self.config = config
        self.step_s = step_s
        tok_path = config.tokenizer or config.model
        vocab_size, self.text_ids = _tokenizer_vocab_and_text(tok_path)
        self.max_model_len = config.max_model_len or _context_len(config.model)
        self.max_num_seqs = config.max_num_seqs or 256  # None: the CPU default
        self.model_info = ModelInfo(
            model_name=config.served_model_name or config.model,
            model_path=config.model,
            max_model_len=self.max_model_len,
            vocab_size=vocab_size,
            worker_id="",
            tokenizer=tok_path,
            max_logprobs=config.max_logprobs,
            sampling_defaults=sampling_defaults(
                read_generation_config(config.model), config.generation_config
            ),
        )
        self.vocab_size = vocab_size
        self.waiting: collections.OrderedDict[str, _FakeRequest] = collections.OrderedDict()
        self.running: dict[str, _FakeRequest] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._next_step = 0.0  # perf_counter() time the next step may start

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, req: EngineRequest, owner: bytes = b"") -> RequestOutput | None:
        p = req.params
        try:
            params = check_request(
                req.prompt_token_ids,
                p,
                self.vocab_size,
                self.max_model_len,
                self.config.max_logprobs,
            )
            if req.request_id in self.waiting or req.request_id in self.running:
                raise ValueError(f"request id {req.request_id!r} is already in use")
        except ValueError as e:
            return RequestOutput(req.request_id, finish_reason=FinishReason.ERROR, error=str(e))
        assert params.max_tokens is not None
        self.waiting[req.request_id] = _FakeRequest(req, params.max_tokens, owner)
        return None

    def abort_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.waiting.pop(rid, None)
            self.running.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def owner_of(self, request_id: str) -> bytes | None:
        r = self.waiting.get(request_id) or self.running.get(request_id)
        return r.owner if r is not None else None

    def request_ids(self, owner: bytes | None = None) -> list[str]:
        reqs = [*self.waiting.values(), *self.running.values()]
        return [r.id for r in reqs if owner is None or r.owner == owner]

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        return [out for _, out in self.step_with_owners()]

    def step_with_owners(self) -> list[tuple[bytes, RequestOutput]]:
        while self.waiting and len(self.running) < self.max_num_seqs:
            _, r = self.waiting.popitem(last=False)
            self.running[r.id] = r
            self.prompt_tokens_total += r.num_prompt
        if not self.running:
            return []
        if self.step_s > 0:  # steps start step_s apart (or back to back when late)
            now = time.perf_counter()
            if self._next_step > now:
                time.sleep(self._next_step - now)
            self._next_step = max(now, self._next_step) + self.step_s
        text, n_text = self.text_ids, len(self.text_ids)
        outputs: list[tuple[bytes, RequestOutput]] = []
        finished = []
        for r in self.running.values():
            tok = text[r.generated % n_text]
            first = r.generated == 0
            r.generated += 1
            reason = stop = None
            if tok in r.stop_ids and r.generated > r.min_tokens:
                reason, stop = FinishReason.STOP, tok
            elif r.generated >= r.max_tokens or r.num_prompt + r.generated >= self.max_model_len:
                reason = FinishReason.LENGTH
            out = RequestOutput(
                r.id,
                new_token_ids=[tok],
                finish_reason=reason,
                stop_reason=stop,
                num_prompt_tokens=r.num_prompt,
            )
            if r.logprobs is not None:
                out.new_logprobs = [self._placeholder_logprobs(tok, r.logprobs)]
            if first and r.prompt_logprobs is not None:
                out.prompt_logprobs = [None] + [
                    self._placeholder_logprobs(t, r.prompt_logprobs) for t in r.prompt[1:]
                ]
            outputs.append((r.owner, out))
            if reason is not None:
                finished.append(r.id)
        for rid in finished:
            del self.running[rid]
        self.generation_tokens_total += len(outputs)
        return outputs

    def _placeholder_logprobs(self, tok: int, top: int) -> TokenLogprobs:
        others = [(tok + k) % self.vocab_size for k in range(1, top + 1)]
        return TokenLogprobs([tok, *others], [0.0] + [-20.0] * len(others), 1)

    def stats(self) -> WorkerStats:
        return WorkerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_free_blocks=1,
            num_total_blocks=1,
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
        )


def _tokenizer_vocab_and_text(path: str) -> tuple[int, list[int]]:
    """(vocabulary size with added tokens, TEXT's token ids) from a tokenizer.json."""
    from tokenizers import Tokenizer

    file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise ValueError(f"the fake engine needs a tokenizer.json; {file} does not exist")
    tok = Tokenizer.from_file(file)
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    return tok.get_vocab_size(with_added_tokens=True), ids


def _context_len(path: str) -> int:
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            n = json.load(f).get("max_position_embeddings")
        if isinstance(n, int) and n > 0:
            return n
    return DEFAULT_MAX_MODEL_LEN
