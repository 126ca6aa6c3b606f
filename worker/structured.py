"""Structured output in the worker: compile grammars, then mask each step's logits.

    gateway: validates the grammar (400 if it does not parse), sends its source
      │  SamplingParams.guided = GuidedDecoding(kind, source)
    worker:  GrammarCompiler (xgrammar, our vocabulary) on a thread pool, cached by source
      │  the request waits outside the scheduler until its grammar is compiled
    each step (worker/grammar_masks.py, on a mask thread while the GPU runs the forward):
      sampled tokens ─► matchers accept them (EOS terminates one) ─► fill the next rows
      sampler: waits for the rows ─► logits[~allowed] = -inf on device

Speculative steps verify 1 + k rows per request: row j is the mask after the first j
proposals, so the matcher accepts them one by one while filling and then rolls back; a
proposal the grammar forbids has probability 0 in its row, so verification rejects it.

A bitmask row is ceil(V / 32) int32 words, bit t of the row being token t allowed; an
unconstrained row is all ones (-1), so constrained and free requests share one batch.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from ipc.messages import FinishReason, GrammarKind, GuidedDecoding, RequestOutput
from worker.device_copy import host_to_device

if TYPE_CHECKING:
    import xgrammar as xgr

    from worker.request import Request

log = logging.getLogger(__name__)

_CACHE_SIZE = 64  # compiled grammars kept (~0.2 MB each for a 128k vocabulary)


def load_vocab_tokenizer(path: str):  # type: ignore[no-untyped-def]
    """The `tokenizers.Tokenizer` of a model folder or .gguf file (vocabulary only)."""
    from tokenizers import Tokenizer as HFTokenizer

    from ipc.model_folder import find_gguf_file

    tokenizer_json = os.path.join(path, "tokenizer.json")
    if os.path.isdir(path) and os.path.exists(tokenizer_json):
        return HFTokenizer.from_file(tokenizer_json)
    gguf = find_gguf_file(path)
    if gguf is None:
        raise ValueError(f"structured output needs a tokenizer: none found at {path}")
    from ipc.gguf_metadata import gguf_tokenizer

    return gguf_tokenizer(gguf).tokenizer


def compile_grammar(compiler: xgr.GrammarCompiler, spec: GuidedDecoding) -> xgr.CompiledGrammar:
    """Compile one grammar; xgrammar raises RuntimeError naming the problem."""
    if spec.kind == GrammarKind.JSON_SCHEMA:
        return compiler.compile_json_schema(
            spec.source, any_whitespace=spec.any_whitespace, strict_mode=True
        )
    if spec.kind == GrammarKind.REGEX:
        return compiler.compile_regex(spec.source)
    if spec.kind == GrammarKind.EBNF:
        return compiler.compile_grammar(spec.source)
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


def compiler_message(e: Exception) -> str:
    """xgrammar's error without its log prefix ("[09:13:31] /project/cpp/x.cc:94: ")."""
    text = str(e).strip() or type(e).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text).strip()


class GrammarBackend:
    """Compiles grammars against one model's vocabulary, off the GPU loop.

    The vocabulary (TokenizerInfo) is built on the pool's thread with the first grammar,
    so an engine that never sees one pays nothing for it.
    """

    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, concurrent.futures.Future[xgr.CompiledGrammar]] = (
            OrderedDict()
        )

    def submit(self, spec: GuidedDecoding) -> concurrent.futures.Future[xgr.CompiledGrammar]:
        """A future of the compiled grammar; the same source shares one compile."""
        import msgspec

        key = msgspec.msgpack.encode(spec)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._cache[key] = fut
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return fut

    def warm_up(self) -> None:
        """Build the vocabulary and compile a tiny grammar now, on this thread."""
        compile_grammar(self.compiler(), GuidedDecoding(GrammarKind.REGEX, "[a-z]"))

    def _compile(self, spec: GuidedDecoding) -> xgr.CompiledGrammar:
        return compile_grammar(self.compiler(), spec)

    def compiler(self) -> xgr.GrammarCompiler:
        if self._compiler is None:
            import xgrammar as xgr

            from ipc.token_bytes import vocab_bytes

            tokenizer = load_vocab_tokenizer(self.tokenizer_path)
            info = xgr.TokenizerInfo(
                vocab_bytes(tokenizer, self.vocab_size),
                xgr.VocabType.RAW,
                vocab_size=self.vocab_size,
                stop_token_ids=self.stop_token_ids,
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        return self._compiler

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RequestGrammar:
    """One request's matcher: where it is in its grammar after its output tokens."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.stop_token_ids = frozenset(compiled.tokenizer_info.stop_token_ids)
        self.failed = False  # a token the grammar rejected was emitted (a bug): stop masking
        # The matcher took a stop token and ended. Tracked here rather than asked of it:
        # an xgrammar call lets go of the GIL, and the mask thread asks for every request.
        self.terminated = False

    @property
    def active(self) -> bool:
        return not (self.failed or self.terminated)

    def accepted(self, token: int, ok: bool) -> None:
        """Record what accepting `token` did (ok: the matcher took it)."""
        if not ok:
            self.failed = True
        elif token in self.stop_token_ids:
            self.terminated = True

    def accept(self, tokens: list[int]) -> bool:
        """Advance over emitted tokens; False (and masking stops) if the grammar refuses one."""
        for t in tokens:
            if not self.active:
                return True
            self.accepted(t, self.matcher.accept_token(t))
            if self.failed:
                return False
        return True

    def fill(self, bitmask: torch.Tensor, row: int, proposals: list[int]) -> None:
        """Rows row .. row + len(proposals): the masks before each proposal and after all.

        Proposals are accepted to fill the later rows, then rolled back: the matcher ends
        where it started. After a proposal the grammar forbids, later rows are never used
        (verification stops at it), so they repeat the last mask.
        """
        m = self.matcher
        if not self.active:
            bitmask[row : row + len(proposals) + 1] = -1
            return
        m.fill_next_token_bitmask(bitmask, row)
        accepted = 0
        for j, t in enumerate(proposals):
            if not m.accept_token(t):
                bitmask[row + j + 1 : row + len(proposals) + 1] = bitmask[row + j]
                break
            accepted += 1
            if m.is_terminated():  # an EOS proposal: the request ends there
                bitmask[row + j + 1 : row + len(proposals) + 1] = -1
                break
            m.fill_next_token_bitmask(bitmask, row + j + 1)
        if accepted:
            m.rollback(accepted)


def fill_rows(
    bitmask: torch.Tensor,
    entries: list[tuple[int, RequestGrammar, list[int]]],
    filler: xgr.BatchGrammarMatcher,
) -> None:
    """Fill each entry's rows `row .. row + len(proposals)` of a host bitmask in place.

    Rows without proposals (plain decode) are filled together by xgrammar's threads."""
    batch: list[xgr.GrammarMatcher] = []
    batch_rows: list[int] = []
    for row, grammar, proposals in entries:
        if not proposals and grammar.active:
            batch.append(grammar.matcher)
            batch_rows.append(row)
        else:
            grammar.fill(bitmask, row, proposals)
    if batch:
        filler.batch_fill_next_token_bitmask(batch, bitmask, batch_rows)


def grammar_bitmask(
    rows: list[tuple[RequestGrammar | None, list[int]]], vocab_size: int, device: torch.device
) -> torch.Tensor | None:
    """The step's bitmask [R, ceil(V/32)] int32 on `device`, one entry per request giving
    1 + len(proposals) rows; None when no request is constrained (nothing to apply).

    The synchronous reference of worker/grammar_masks.py's StepMasks, which prepares the
    same rows on a thread while the GPU runs the forward."""
    if all(g is None for g, _ in rows):
        return None
    num_rows = sum(1 + len(p) for _, p in rows)
    bitmask = torch.full((num_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    entries: list[tuple[int, RequestGrammar, list[int]]] = []
    row = 0
    for grammar, proposals in rows:
        if grammar is not None:
            entries.append((row, grammar, proposals))
        row += 1 + len(proposals)
    fill_rows(bitmask, entries, _batch_matcher())
    return host_to_device(bitmask, device)


_BATCH: list[xgr.BatchGrammarMatcher] = []


def _batch_matcher() -> xgr.BatchGrammarMatcher:
    if not _BATCH:
        import xgrammar as xgr

        _BATCH.append(xgr.BatchGrammarMatcher("auto"))
    return _BATCH[0]


_BIT_VALUES: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(x: torch.Tensor, bitmask: torch.Tensor) -> None:
    """x [R, V] float: tokens whose bit is 0 get -inf, in place (no host sync)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
        import xgrammar as xgr

        # Its C++ loop takes half the time of the torch expansion on a CPU.
        xgr.apply_token_bitmask_inplace(x, bitmask.contiguous(), vocab_size=x.shape[1])
        return
    apply_bitmask_torch(x, bitmask)


def apply_bitmask_torch(x: torch.Tensor, bitmask: torch.Tensor) -> None:
    """apply_bitmask in torch ops, for any device (no kernel to build).

    The int32 words are read as bytes (little-endian, as on x86, ARM and the GPU): byte k
    of word w holds tokens 32w + 8k .. 32w + 8k + 7, so the expanded mask is [R, 32W]
    uint8, a quarter of an int32 expansion's traffic."""
    bit_values = _BIT_VALUES.get(x.device)
    if bit_values is None:
        bit_values = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=x.device)
        _BIT_VALUES[x.device] = bit_values
    by = bitmask.contiguous().view(torch.uint8)  # [R, 4W]
    allowed = (by.unsqueeze(-1) & bit_values).view(bitmask.shape[0], -1)[:, : x.shape[1]]
    x.masked_fill_(allowed == 0, -float("inf"))


class GrammarWaitlist:
    """Constrained requests whose grammar is still compiling; the engine's step admits
    them to the scheduler once it has, or fails them with the compiler's message."""

    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.backend = GrammarBackend(tokenizer_path, vocab_size, stop_token_ids)
        self._waiting: dict[str, tuple[Request, concurrent.futures.Future[xgr.CompiledGrammar]]]
        self._waiting = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._waiting

    def add(self, request: Request) -> None:
        assert request.params.guided is not None
        self._waiting[request.request_id] = (request, self.backend.submit(request.params.guided))

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._waiting.pop(rid, None)

    def close(self) -> None:
        """Drop the waiting requests and stop the compiler's thread (EngineCore.shutdown)."""
        self._waiting.clear()
        self.backend.close()

    def get(self, request_id: str) -> Request | None:
        entry = self._waiting.get(request_id)
        return entry[0] if entry is not None else None

    def requests(self) -> list[Request]:
        return [request for request, _ in self._waiting.values()]

    def take_ready(self, wait: bool) -> tuple[list[Request], list[tuple[bytes, RequestOutput]]]:
        """Requests whose grammar compiled (matcher set), and ERROR outputs (with their
        requests' owners) for those whose grammar did not. With `wait` (nothing else to
        run), block up to 5 ms for one."""
        if not self._waiting:
            return [], []
        if wait:
            futures = [f for _, f in self._waiting.values()]
            concurrent.futures.wait(futures, 0.005, concurrent.futures.FIRST_COMPLETED)
        ready, failed = [], []
        for rid, (request, fut) in list(self._waiting.items()):
            if not fut.done():
                continue
            del self._waiting[rid]
            try:
                request.grammar = RequestGrammar(fut.result())
            except Exception as e:  # xgrammar raises RuntimeError; anything else is ours
                why = compiler_message(e)
                error = f"invalid grammar: {why}"
                out = RequestOutput(rid, finish_reason=FinishReason.ERROR, error=error)
                failed.append((request.owner, out))
                continue
            ready.append(request)
        return ready, failed
