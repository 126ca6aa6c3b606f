"""Every message that crosses a process boundary.

Gateways and workers exchange these as msgpack frames over ZeroMQ (see ipc/wire.py); the
offline `LLM` class uses the same structs in process. Nothing here imports torch, so the
gateway stays light. Structs are `array_like` (positional on the wire, smaller and faster),
`omit_defaults`, and `gc=False` because they hold no cycles.
"""

from __future__ import annotations

import enum
import math

import msgspec


class FinishReason(enum.IntEnum):
    """Why a request stopped; the names match OpenAI's `finish_reason` strings."""

    STOP = 0  # EOS, a stop token id, or (gateway side) a stop string
    LENGTH = 1  # max_tokens or the model's context length
    ABORT = 2  # cancelled by the client or the gateway
    ERROR = 3  # rejected or failed inside the worker; `error` says why

    def __str__(self) -> str:
        return self.name.lower()


class GrammarKind(enum.IntEnum):
    """What `GuidedDecoding.source` holds."""

    JSON_SCHEMA = 0  # a JSON schema as JSON text (response_format json_object: {"type": "object"})
    REGEX = 1
    EBNF = 2  # xgrammar's EBNF (GBNF-like); guided_choice becomes one of these


class GuidedDecoding(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A grammar the output must follow. The source travels, not the compiled grammar: the
    worker compiles it against its vocabulary (a compiled JSON grammar for a 128k vocabulary
    serializes to 0.25-0.8 MB; the source is a few hundred bytes and compiles in ~30 ms)."""

    kind: GrammarKind
    source: str = ""
    # JSON only: allow any whitespace between tokens; off, separators are ", " and ": ",
    # so a weak model cannot spend its tokens on newlines and never close the object.
    any_whitespace: bool = False


# KV cache compression methods (worker/kv_compression.py): SnapKV, PyramidKV (SnapKV's
# scores with budgets shrinking with depth), and StreamingLLM's sinks + recent tokens.
KV_COMPRESSION_METHODS = ("snapkv", "pyramidkv", "streaming")


def check_kv_budget(budget: float, window: int, field: str) -> None:
    """ValueError naming `field` unless `budget` is a ratio in (0, 1) of the prompt, or a
    whole number of tokens (kept per layer and KV head, the window included) > window."""
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"{field} must be a ratio in (0, 1) or a token count, got {budget!r}")
    if budget >= 1 and budget != int(budget):
        raise ValueError(f"{field} must be a ratio in (0, 1) or a whole token count, got {budget}")
    if budget >= 1 and window and budget <= window:
        raise ValueError(
            f"{field} ({int(budget)} tokens) must be larger than the observation window ({window})"
        )


class KVCompression(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A request's KV cache compression; zero fields take the worker's flags."""

    method: str  # one of KV_COMPRESSION_METHODS, or "none" (off for this request)
    budget: float = 0.0  # ratio in (0, 1) or tokens kept per layer and KV head; 0: the flag's
    window: int = 0  # observation window (the prompt's last queries); 0: the flag's

    def validate(self) -> None:
        if self.method not in (*KV_COMPRESSION_METHODS, "none"):
            methods = ", ".join((*KV_COMPRESSION_METHODS, "none"))
            raise ValueError(f"kv_compression.method must be one of {methods}, got {self.method!r}")
        if not 0 <= self.window <= 4096:
            raise ValueError(f"kv_compression.window must be in [0, 4096], got {self.window}")
        if self.budget:
            check_kv_budget(self.budget, self.window, "kv_compression.budget")


class SamplingParams(msgspec.Struct, omit_defaults=True, gc=False):
    """How to pick tokens for one request. Names and defaults follow vLLM's SamplingParams."""

    n: int = 1  # completions per prompt (fanned out by the caller into n requests)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 keeps all
    min_p: float = 0.0  # drop tokens below min_p * p(most likely), in [0, 1]
    seed: int | None = None  # per-request seed: same seed, same tokens, whatever the batch
    presence_penalty: float = 0.0  # in [-2, 2], OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0  # in [-2, 2], OpenAI semantics, over generated tokens
    repetition_penalty: float = 1.0  # > 0, CTRL-style, over prompt and generated tokens
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0  # EOS and stop token ids are suppressed until this many
    stop: list[str] = []  # stop strings (matched by the detokenizing side)
    stop_token_ids: list[int] = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # return the sampled token's logprob plus this many top ones
    prompt_logprobs: int | None = None  # same, for every prompt token after the first
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    guided: GuidedDecoding | None = None  # structured output: the grammar to follow
    # OpenAI's logit_bias: token id -> a value in [-100, 100] added to its logit each step
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens can be drawn
    kv_compression: KVCompression | None = None  # None: the worker's --kv-compression

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self, max_logprobs: int = 20) -> None:
        """Raise ValueError naming the first field out of range."""

        def bad(field: str, rule: str, value: object) -> ValueError:
            return ValueError(f"{field} must be {rule}, got {value!r}")

        if not 1 <= self.n <= 128:
            raise bad("n", "in [1, 128]", self.n)
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "a finite number >= 0", self.temperature)
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]", self.top_p)
        if self.top_k < -1:
            raise bad("top_k", "-1, 0 (disabled) or a positive integer", self.top_k)
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]", self.min_p)
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "in [-2, 2]", self.presence_penalty)
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 100):
            raise bad("repetition_penalty", "in (0, 100]", self.repetition_penalty)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "at least 1", self.max_tokens)
        if self.min_tokens < 0:
            raise bad("min_tokens", ">= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            raise bad("logprobs", f"in [0, {max_logprobs}]", self.logprobs)
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= max_logprobs:
            raise bad("prompt_logprobs", f"in [0, {max_logprobs}]", self.prompt_logprobs)
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise bad("seed", "a 64-bit integer", self.seed)
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "non-negative token ids", self.stop_token_ids)
        if any(not s for s in self.stop):
            raise bad("stop", "non-empty strings", self.stop)
        for token, value in (self.logit_bias or {}).items():
            if token < 0 or not (math.isfinite(value) and -100 <= value <= 100):
                raise bad("logit_bias", "token ids -> values in [-100, 100]", {token: value})
        if self.allowed_token_ids is not None and (
            not self.allowed_token_ids or any(t < 0 for t in self.allowed_token_ids)
        ):
            raise bad("allowed_token_ids", "a non-empty list of token ids", self.allowed_token_ids)
        if self.kv_compression is not None:
            self.kv_compression.validate()


class EngineRequest(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, gc=False):
    """Gateway -> worker: a new request, already tokenized."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0


class AbortRequests(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Gateway -> worker: stop these requests now and free what they hold."""

    request_ids: list[str]


class Hello(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Gateway -> worker on connect, and worker -> gateway in reply (with model info)."""

    gateway_id: str


class TokenLogprobs(msgspec.Struct, array_like=True, gc=False):
    """Logprobs at one position: the chosen token first, then the top-N alternatives.

    `rank` is the chosen token's 1-based rank in the model's distribution.
    """

    token_ids: list[int]
    logprobs: list[float]
    rank: int


class RequestOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Worker -> gateway: what one request gained in one engine step (a diff)."""

    request_id: str
    new_token_ids: list[int] = []
    new_logprobs: list[TokenLogprobs] | None = None
    # Only in the first output of a request that asked for them; None for the first token.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id that ended it, if any
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # with FinishReason.ERROR
    # In a request's first output only: seconds from its arrival in the engine to its
    # first scheduling (vllm:request_queue_time_seconds).
    queue_time: float | None = None
    error_status: int = 0  # with ERROR: 429 overloaded, 503 draining / queue wait, else 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class WorkerStats(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A worker's load and counters, sent with outputs and with heartbeats.

    The first four fields and `num_inbox` are the load report every gateway routes by
    (running, waiting, inbox, KV blocks), so N gateways see the same load however the
    requests were spread among them.
    """

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_preemptions: int = 0  # counter
    prompt_tokens: int = 0  # counter: prompt tokens computed (prefix hits excluded)
    generation_tokens: int = 0  # counter
    prefix_cache_queries: int = 0  # counter, tokens
    prefix_cache_hits: int = 0  # counter, tokens
    spec_proposed: int = 0  # counter, tokens
    spec_accepted: int = 0  # counter, tokens
    spec_steps: int = 0  # counter, verification steps
    # Requests admitted with no first token yet (worker/admission.py): a subset of
    # num_running + num_waiting (the engine holds them), so no part of the load.
    num_queued: int = 0
    num_queued_tokens: int = 0  # their prompt tokens
    num_refused: int = 0  # counter: refused as overloaded or draining
    draining: bool = False  # shutting down: routes new requests elsewhere
    # Requests that reached the worker's socket but not yet its engine loop (set by the
    # worker server, not the engine): during a long step, other gateways see them here.
    num_inbox: int = 0

    @property
    def kv_cache_usage(self) -> float:
        if self.num_total_blocks == 0:
            return 0.0
        return 1.0 - self.num_free_blocks / self.num_total_blocks


class ModelInfo(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Worker -> gateway in reply to Hello: enough to tokenize and validate."""

    model_name: str
    model_path: str
    max_model_len: int
    vocab_size: int
    worker_id: str
    tokenizer: str | None = None  # where the gateway loads the tokenizer; None: model_path
    max_logprobs: int = 20  # the largest logprobs / prompt_logprobs a request may ask for
    block_size: int = 16  # KV block size: the unit of prefix-cache keys (prefix routing)
    # Request defaults from the model's generation_config.json (field -> value), see
    # worker/generation_defaults.py; a request's own values win.
    sampling_defaults: dict[str, float] = {}
    max_num_queued_reqs: int | None = None  # the worker's overload limits (429 past them)
    max_num_queued_tokens: int | None = None


class EngineOutputs(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, gc=False):
    """Worker -> gateway: one step's outputs for that gateway's requests, batched."""

    outputs: list[RequestOutput] = []
    stats: WorkerStats | None = None
    timestamp: float = 0.0
    # Requests from the receiving gateway that have reached this worker so far (all of
    # them are in `stats`: queued, waiting, running or done); the gateway counts the ones
    # it sent beyond this as load no report shows yet.
    received: int = 0


class Heartbeat(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Worker -> gateway, every heartbeat interval, even when idle."""

    worker_id: str
    stats: WorkerStats
    timestamp: float
    received: int = 0  # as in EngineOutputs: this gateway's requests that reached the worker


# The tagged union that travels gateway -> worker and worker -> gateway.
ToWorker = EngineRequest | AbortRequests | Hello
ToGateway = EngineOutputs | Heartbeat | ModelInfo


# ---- tensor parallel: leader -> followers, through the shared-memory ring (ipc/shm_ring.py)


class TpStep(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, gc=False):
    """One forward of the leader's step: the followers run it on their shards. The flat
    batch travels as raw little-endian arrays (worker/input_batch.py HostInputs)."""

    input_ids: bytes  # [T] int64
    positions: bytes  # [T] int64
    slot_mapping: bytes  # [T] int64
    query_start_loc: bytes  # [B + 1] int32
    seq_lens: bytes  # [B] int32
    block_tables: bytes  # [B, block_table_width] int32, row-major
    block_table_width: int
    max_query_len: int
    max_seq_len: int
    use_graph: bool = False  # the leader replays a CUDA graph: every rank must
    ids_from_leader: bool = False  # the ids come next by broadcast (async scheduling)


class TpLogits(msgspec.Struct, tag=True, array_like=True, gc=False):
    """The leader computes logits of `num_rows` hidden rows: they come next by broadcast,
    and every rank's slice of the vocabulary is gathered."""

    num_rows: int


TpMessage = TpStep | TpLogits
