"""The engine core: requests in, one schedule-run-update step at a time, token diffs out.

Token ids only: tokenizing and detokenizing happen on the caller's side (gateway or LLM).
The worker process (worker/server.py) runs this in its GPU-loop thread; `LLM` drives it
in process.
"""

from __future__ import annotations

import logging
import time

import torch

from ipc.messages import (
    EngineRequest,
    FinishReason,
    ModelInfo,
    RequestOutput,
    WorkerStats,
)
from ipc.model_folder import ModelFiles, open_model
from ipc.sampling import check_request
from worker import progress
from worker.config import EngineConfig, SchedulerConfig, default_max_num_batched_tokens
from worker.generation_defaults import sampling_defaults
from worker.kv_cache import KVCacheManager
from worker.model_config import ModelConfig
from worker.model_loader import build_model, resolve_device, resolve_dtype
from worker.model_runner import (
    ModelRunner,
    PendingStep,
    StepResult,
    kv_bytes_per_block,
    make_backend,
)
from worker.parallel.plan import ShardPlan, check_checkpoint_splits
from worker.parallel.state import TpGroup
from worker.quant.config import resolve_fp8_scheme
from worker.quant.kv import resolve_kv_cache_dtype
from worker.request import Request, RequestStatus
from worker.scheduler import Scheduler, SchedulerOutput
from worker.spec_decode import SpecStats, make_proposer, set_proposals
from worker.structured import GrammarWaitlist, advance_grammars

log = logging.getLogger(__name__)

GiB = 1 << 30
CPU_KV_CACHE_GB = 1.0  # the KV cache on CPU when neither a size nor a block count is given


class EngineCore:
    def __init__(self, config: EngineConfig, tp: TpGroup | None = None) -> None:
        """`tp`: this engine is one rank of a tensor-parallel group (headrace/tp_group.py
        starts them). The leader (rank 0) is a whole engine; a follower stops after its
        model and KV cache, and runs worker/parallel/follower.py's loop."""
        config.validate()
        self.config = config
        self.tp = tp
        num_blocks = self._init_device()
        if tp is not None and not tp.is_leader:
            return
        mc = self.model_config
        self.model_info = ModelInfo(
            model_name=config.served_model_name or config.model,
            model_path=self.files.path,
            max_model_len=self.max_model_len,
            vocab_size=mc.vocab_size,
            worker_id="",
            tokenizer=config.tokenizer or self.files.tokenizer_path,
            max_logprobs=config.max_logprobs,
            block_size=config.block_size,
            sampling_defaults=sampling_defaults(
                self.files.generation_config, config.generation_config
            ),
        )
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        eos = set(self.eos_token_ids)
        self.proposer = make_proposer(
            config, mc, self.device, self.dtype, num_blocks, self.max_model_len, eos
        )
        if self.proposer is not None:
            self.runner.draft_probs = self.proposer.draft_probs
        self.spec_stats = SpecStats()
        self.grammars = GrammarWaitlist(
            config.tokenizer or self.files.tokenizer_path, mc.vocab_size, sorted(eos)
        )
        # Async scheduling: a launched step whose tokens have not been read yet.
        self._inflight: tuple[SchedulerOutput, PendingStep] | None = None

    def _init_device(self) -> int:
        """Checkpoint, model, KV cache and CUDA graphs; returns the KV block count. Every
        rank of a tensor-parallel group runs this, in this order: its collectives (the
        memory profile's forward, the block count's minimum, graph capture) must match."""
        config = self.config
        self._open_checkpoint()
        self.runner = self._load_model()
        max_batched = config.max_num_batched_tokens or default_max_num_batched_tokens(
            self.device.type, config.enable_chunked_prefill, self.max_model_len
        )
        num_blocks = self._num_kv_blocks(max_batched)
        if self.tp is not None:  # every rank holds the same blocks: the smallest count
            num_blocks = self.tp.min_int(num_blocks)
        self._allocate_kv_cache(num_blocks, max_batched)
        return num_blocks

    def _open_checkpoint(self) -> None:
        """The model's files and config, context length, device, dtypes (no weights)."""
        config = self.config
        self.files: ModelFiles = open_model(config.model, config.load_format)
        self.model_config = mc = ModelConfig.from_hf(self.files.config, source=self.files.path)
        self.eos_token_ids = frozenset(_eos_ids(self.files, mc))
        self.max_model_len = config.max_model_len or mc.max_context
        if self.max_model_len > mc.max_context:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) is larger than the model's context "
                f"length ({mc.max_context}, max_position_embeddings in {self.files.path})"
            )
        self.device = resolve_device(config.device)
        # Tensor parallel: this rank's heads (the KV cache holds only those).
        self.rank_config = mc
        if self.tp is not None:
            self.device = self.tp.device if self.device.type == "cuda" else self.device
            check_checkpoint_splits(self.files.config, self.tp.size, self.files.path)
            self.rank_config = ShardPlan.make(mc, self.tp.rank, self.tp.size).rank_config(mc)
        self.dtype = resolve_dtype(config.dtype, self.device, mc.torch_dtype)
        self.quant = resolve_fp8_scheme(self.files.config, config.quantization, self.files.path)
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)

    def _load_model(self) -> ModelRunner:
        config, mc = self.config, self.model_config
        t0 = time.perf_counter()
        what = "random (dummy) weights" if config.load_format == "dummy" else "weights"
        with progress.stage(f"loading {what} of {self.files.path}"):
            model = build_model(
                self.files,
                mc,
                make_backend(self.device),
                self.max_model_len,
                self.device,
                self.dtype,
                dummy=config.load_format == "dummy",
                seed=config.seed,
                quant=self.quant,
                group=self.tp,
            )
        log.info(
            "loaded %s in %.1fs (weights: %s)",
            self.files.path,
            time.perf_counter() - t0,
            f"fp8, {self.quant.source}" if self.quant else str(self.dtype),
        )
        eos = set(self.eos_token_ids)
        rc = self.rank_config
        return ModelRunner(model, rc, self.device, self.dtype, eos, config.seed, self.kv_dtype)

    def _allocate_kv_cache(self, num_blocks: int, max_batched: int) -> None:
        """The KV cache tensors (and CUDA graphs over them), their manager, the scheduler."""
        config = self.config
        log.info(
            "KV cache: %d blocks of %d tokens, %s (%d bytes per block)",
            num_blocks,
            config.block_size,
            self.kv_dtype,
            kv_bytes_per_block(self.rank_config, config.block_size, self.kv_dtype),
        )
        self.runner.allocate_kv_cache(num_blocks, config.block_size)
        progress.note(f"KV cache: {num_blocks} blocks of {config.block_size} tokens")
        if self.device.type == "cuda" and not config.enforce_eager:
            with progress.stage("capturing CUDA graphs"):
                self.runner.capture_cuda_graphs(
                    config.max_num_seqs,
                    self.max_model_len,
                    config.block_size,
                    config.num_speculative_tokens,
                )
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=max_batched,
                max_model_len=self.max_model_len,
                enable_chunked_prefill=config.enable_chunked_prefill,
                num_lookahead_tokens=config.num_speculative_tokens,
            ),
            self.kv,
        )

    def _num_kv_blocks(self, max_batched_tokens: int) -> int:
        c = self.config
        per_block = kv_bytes_per_block(self.rank_config, c.block_size, self.kv_dtype)
        if c.num_gpu_blocks is not None:
            return c.num_gpu_blocks
        if self.device.type == "cpu":
            budget = int((c.kv_cache_memory_gb or CPU_KV_CACHE_GB) * GiB)
        elif c.kv_cache_memory_gb is not None:
            budget = self._fixed_gpu_kv_budget(c.kv_cache_memory_gb, max_batched_tokens)
        else:
            budget = self.runner.profile_free_memory(max_batched_tokens, c.gpu_memory_utilization)
        draft = self._draft_model_config()
        if draft is not None:
            # The draft model lives in the same budget: its weights, and a KV block beside
            # each target block (plus k slots per request, see make_proposer).
            draft_block = kv_bytes_per_block(draft, c.block_size, self.dtype)
            extra = c.max_num_seqs * -(-c.num_speculative_tokens // c.block_size)
            if self.device.type == "cuda":
                budget -= param_bytes(draft, self.dtype)
            budget -= extra * draft_block
            per_block += draft_block
        num = budget // per_block
        if num < 1:
            raise ValueError(
                f"no memory left for the KV cache (one block needs {per_block} bytes); "
                "raise --gpu-memory-utilization / --kv-cache-memory-gb or shrink the model"
            )
        return int(num)

    def _fixed_gpu_kv_budget(self, gb: float, max_batched_tokens: int) -> int:
        """--kv-cache-memory-gb on a GPU: that many bytes, if they fit beside a worst-case step.

        Other processes on the same GPU do not change it (unlike the utilization sizing),
        so several engines can share a card.
        """
        budget = int(gb * GiB)
        room = self.runner.profile_free_memory(max_batched_tokens, 1.0)
        if budget > room:
            raise ValueError(
                f"--kv-cache-memory-gb {gb:g} does not fit: {room / GiB:.2f} GiB of GPU memory "
                "is free after the weights and a worst-case step"
            )
        return budget

    def _draft_model_config(self) -> ModelConfig | None:
        c = self.config
        if not c.speculative_model or c.num_speculative_tokens == 0:
            return None
        from worker.spec_decode.draft import open_draft_model

        files = open_draft_model(c.speculative_model, "dummy")  # only its config is read
        return ModelConfig.from_hf(files.config, source=files.path)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, req: EngineRequest) -> RequestOutput | None:
        """Admit a request; an ERROR output (and nothing else changes) if it is invalid."""
        try:
            request = self._make_request(req)
            # A constrained request joins the scheduler once its grammar compiles; its id
            # is taken from now.
            self.scheduler.check_new_id(req.request_id, also_taken=self.grammars)
            if req.params.guided is None:
                self.scheduler.add_request(request)
            else:
                self.grammars.add(request)
        except ValueError as e:
            return RequestOutput(req.request_id, finish_reason=FinishReason.ERROR, error=str(e))
        return None

    def _make_request(self, req: EngineRequest) -> Request:
        prompt = req.prompt_token_ids
        params = check_request(
            prompt,
            req.params,
            self.model_config.vocab_size,
            self.max_model_len,
            self.config.max_logprobs,
        )
        assert params.max_tokens is not None
        need = len(prompt) + params.max_tokens + self.config.num_speculative_tokens
        if not self.kv.can_fit(need):
            raise ValueError(
                f"the request needs {self.kv.blocks_needed(need)} KV cache blocks but the cache "
                f"has only {self.kv.num_blocks}; shorten the prompt or max_tokens"
            )
        return Request(req.request_id, list(prompt), params, self.eos_token_ids, req.arrival_time)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.grammars.abort(request_ids)
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        # A broken tensor-parallel group has work: step() raises, and the worker exits.
        broken = self.tp is not None and self.tp.failure is not None
        return self.scheduler.has_unfinished_requests() or bool(self.grammars) or broken

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.tp is None:
            return self._step_all()
        # Tensor parallel: any failure may leave the followers mid-collective, out of step
        # with us; the group cannot go on (FatalEngineError: the worker restarts it).
        self.tp.check()
        try:
            return self._step_all()
        except Exception as e:
            self.tp.check(e)
            raise

    def _step_all(self) -> list[RequestOutput]:
        ready, failed = self.grammars.take_ready(wait=not self.scheduler.has_unfinished_requests())
        for request in ready:
            self.scheduler.add_request(request)
        return failed + self._step()

    def _step(self) -> list[RequestOutput]:
        if self.config.async_scheduling:
            return self._step_async()
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        result = self.runner.execute(sched)
        return self._postprocess(sched, result)

    def _step_async(self) -> list[RequestOutput]:
        """One step, with the next decode step launched before this one's tokens are read.

        While the GPU runs step N, the CPU schedules N+1 (same requests, one token each),
        builds its inputs and queues it, feeding N's sampled ids on the device; only then
        does it wait for N's tokens and apply them. A request that N finishes (EOS, stop
        id) has its N+1 token dropped. With a constrained request in the batch, N+1's
        sampling waits for N's tokens (its masks follow them) but its forward does not.
        Steps that are not plain decodes, or whose successor would differ from a normal
        schedule, run as usual.
        """
        if self._inflight is not None:
            sched, pending = self._inflight
            self._inflight = None
        else:
            sched = self.scheduler.schedule()
            if sched.empty:
                return []
            if not self.runner.can_launch(sched):
                return self._postprocess(sched, self.runner.execute(sched))
            pending = self.runner.launch(sched)
        nxt_pending = None
        if self._can_chain(sched):
            nxt = self.scheduler.schedule_chained(sched)
            if nxt is not None:
                # Constrained requests' masks need this step's tokens: sample after them.
                defer = any(sr.request.grammar is not None for sr in nxt.scheduled)
                nxt_pending = self.runner.launch(
                    nxt, pending.token_ids, step_offset=1, defer_sampling=defer
                )
                self._inflight = (nxt, nxt_pending)
        outputs = self._postprocess(sched, self.runner.finish(pending))
        if nxt_pending is not None and nxt_pending.token_ids is None:
            self.runner.sample_pending(nxt_pending)
        return outputs

    def _can_chain(self, sched: SchedulerOutput) -> bool:
        """Would the step after `sched` be these same requests decoding one token each?"""
        if self.proposer is not None:
            return False
        for sr in sched.scheduled:
            req, p = sr.request, sr.request.params
            if req.is_finished or req.status != RequestStatus.RUNNING:
                return False
            # Finishes for sure at this step (length): nothing to chain for it.
            if req.num_output_tokens + 1 >= req.max_tokens:
                return False
            if req.num_tokens + 1 >= self.max_model_len:
                return False
            # Sampling that reads the generated tokens would miss the one in flight.
            if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
                return False
            if req.num_output_tokens < p.min_tokens:
                return False
        # A normal schedule might admit a waiting request: keep the same policy.
        waiting = self.scheduler.waiting
        if waiting and self.scheduler.num_running < self.config.max_num_seqs:
            first = waiting[0]
            reserve = self.scheduler.num_running  # the running requests' next slots
            if self.kv.blocks_needed(first.num_tokens) + reserve <= self.kv.num_free_blocks:
                return False
        return True

    def _postprocess(self, sched: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        for i, lps in result.prompt_logprobs.items():
            sr = sched.scheduled[i]
            req = sr.request
            if req.prompt_logprobs is None:
                req.prompt_logprobs = [None]
            # Entry p is prompt token p's; this chunk's first predicts token start + 1. A
            # request preempted mid-prefill recomputes from 0: drop what it had past here.
            del req.prompt_logprobs[sr.start + 1 :]
            req.prompt_logprobs.extend(lps)
        for sr in sched.scheduled:
            if sr.start < sr.request.num_prompt_tokens:
                self.prompt_tokens_total += min(sr.end, sr.request.num_prompt_tokens) - sr.start
        updates = self.scheduler.update(sched, result.new_tokens)
        advance_grammars(updates)
        if self.proposer is not None:
            self.spec_stats.count(sched, result.new_tokens)
            set_proposals(
                self.proposer,
                [req for req, _ in updates],
                self.scheduler.running,
                self.config.num_speculative_tokens,
                self.max_model_len,
            )
        outputs = []
        # update() skips requests that finished before this step's tokens arrived.
        index = {sr.request.request_id: i for i, sr in enumerate(sched.scheduled)}
        for req, tokens in updates:
            i = index[req.request_id]
            if not tokens and req.finish_reason is None:
                continue
            self.generation_tokens_total += len(tokens)
            new_lps = result.logprobs[i][: len(tokens)] if result.logprobs[i] else None
            out = RequestOutput(
                req.request_id,
                new_token_ids=tokens,
                new_logprobs=new_lps,
                finish_reason=req.finish_reason,
                stop_reason=req.stop_reason,
                num_prompt_tokens=req.num_prompt_tokens,
                num_cached_tokens=req.num_cached_tokens,
            )
            if not req.queue_time_sent and req.first_scheduled_at is not None:
                out.queue_time = req.first_scheduled_at - req.added_at
                req.queue_time_sent = True
            if req.params.prompt_logprobs is not None and not req.prompt_logprobs_sent:
                out.prompt_logprobs = req.prompt_logprobs or [None]
                req.prompt_logprobs_sent = True
            outputs.append(out)
        return outputs

    def stats(self) -> WorkerStats:
        return WorkerStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            spec_proposed=self.spec_stats.proposed,
            spec_accepted=self.spec_stats.accepted,
            spec_steps=self.spec_stats.steps,
        )


def _eos_ids(files: ModelFiles, mc: ModelConfig) -> set[int]:
    ids = set(mc.eos_token_ids)
    gen = files.generation_config.get("eos_token_id")
    if isinstance(gen, list):
        ids.update(int(t) for t in gen)
    elif gen is not None:
        ids.add(int(gen))
    return ids


def param_bytes(mc: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of a model's weights, from its shapes (for memory planning): the model built on
    the meta device, so every family's layout counts without allocating anything."""
    from worker.attention import TorchAttention
    from worker.model_loader import model_class

    with torch.device("meta"):
        model = model_class(mc)(mc, TorchAttention(), 1)
    count = sum(p.numel() for p in model.parameters())
    return count * torch.tensor([], dtype=dtype).element_size()
