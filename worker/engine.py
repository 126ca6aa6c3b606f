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
from worker import gc_control, progress
from worker.async_step import AsyncStepper
from worker.batch_defaults import device_batch_defaults, resolve_batch_limits
from worker.config import EngineConfig, SchedulerConfig
from worker.generation_defaults import sampling_defaults
from worker.kv_cache import KVCacheManager
from worker.model_config import ModelConfig
from worker.model_facts import eos_ids, param_bytes
from worker.model_loader import build_model, resolve_device, resolve_dtype
from worker.model_runner import ModelRunner, StepResult, kv_bytes_per_block, make_backend
from worker.parallel.state import TpGroup
from worker.quant.kv import resolve_kv_cache_dtype
from worker.quant.scheme import describe as describe_quant
from worker.quant.scheme import resolve_quant_scheme
from worker.request import OwnedOutput, Request
from worker.scheduler import Scheduler, SchedulerOutput
from worker.spec_decode import SpecStats, Target, draft_extra_blocks, make_proposer, set_proposals
from worker.structured import GrammarWaitlist

log = logging.getLogger(__name__)

GiB = 1 << 30
CPU_KV_CACHE_GB = 1.0  # the KV cache on CPU when neither a size nor a block count is given


class EngineCore:
    tp: TpGroup | None = None  # tensor parallel: this rank's group (worker/parallel/engine.py)

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        self._open_checkpoint()
        self.config = config = self._with_batch_limits(config)
        self.runner = self._load_model()
        self.runner.kv_compressor.configure(config, self.model_config)  # or a ValueError
        max_batched = self.max_num_batched_tokens
        num_blocks = self._num_kv_blocks(max_batched)
        self._allocate_kv_cache(num_blocks, max_batched)
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
        target = Target(
            mc, self.device, self.dtype, num_blocks, self.max_model_len, self.eos_token_ids
        )
        self.proposer = make_proposer(config, target)
        if self.proposer is not None:
            self.runner.draft_probs = self.proposer.draft_probs
        self.spec_stats = SpecStats()
        self.grammars = GrammarWaitlist(
            config.tokenizer or self.files.tokenizer_path, mc.vocab_size, sorted(self.eos_token_ids)
        )
        # Nothing blocks between a step's tokens and the next sampling: mask jobs run eagerly.
        self.runner.masks.eager = config.async_scheduling
        # Async scheduling (worker/async_step.py); speculative decoding steps synchronously.
        self.stepper = (
            AsyncStepper(self) if config.async_scheduling and self.proposer is None else None
        )
        self.closed = False
        gc_control.freeze_startup_heap()  # full collections skip the start-up heap

    def shutdown(self) -> None:
        """Free the engine's device memory now, whoever still holds the engine: the CUDA
        graphs (and their memory pool), the KV cache, the weights, the draft model's.
        Unfinished requests are dropped; the engine takes no more. Safe to call twice.

        Without it the memory goes only when the last reference to the engine does, which
        a caller's variable, a traceback or a test can postpone past the next allocation
        (the benchmark's HF baseline loads a second copy of the model right after). Even
        `del engine` is not enough alone: the first model build in a process imports
        torch._dynamo, whose torch.fx.wrap keeps its own frame in a cycle, and that frame's
        callers up to EngineCore.__init__ (self) until the garbage collector runs.
        """
        if self.closed:
            return
        self.closed = True
        if self.stepper is not None:
            self.stepper.drop()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no graph replay still running at reset
        self.grammars.close()
        self.runner.masks.close()  # joins a mask job still running
        self.scheduler.abort_requests([r.request_id for r in self.scheduler.running])
        self.scheduler.abort_requests([r.request_id for r in self.scheduler.waiting])
        self.runner.release()
        if self.proposer is not None:
            self.proposer.release()
        gc_control.collect_all()  # reference cycles over what was just dropped, frozen too
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> EngineCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the engine is shut down")

    def _open_checkpoint(self) -> None:
        """The model's files and config, context length, device, dtypes (no weights)."""
        config = self.config
        self.files: ModelFiles = open_model(config.model, config.load_format)
        self.model_config = mc = ModelConfig.from_hf(self.files.config, source=self.files.path)
        self.eos_token_ids = frozenset(eos_ids(self.files, mc))
        self.max_model_len = config.max_model_len or mc.max_context
        if self.max_model_len > mc.max_context:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) is larger than the model's context "
                f"length ({mc.max_context}, {mc.max_context_origin()} in {self.files.path})"
            )
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device, mc.torch_dtype)
        self.quant = resolve_quant_scheme(
            self.files.config, config.quantization, self.files.path, config.load_format == "dummy"
        )
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)

    def _with_batch_limits(self, config: EngineConfig) -> EngineConfig:
        """The config with max_num_seqs and max_num_batched_tokens set (the device's
        defaults for those not given, worker/batch_defaults.py)."""
        defaults = device_batch_defaults(self.device, config.usage_context)
        seqs, tokens = resolve_batch_limits(
            config.max_num_seqs,
            config.max_num_batched_tokens,
            defaults,
            config.enable_chunked_prefill,
            self.max_model_len,
        )
        self.max_num_seqs, self.max_num_batched_tokens = seqs, tokens
        log.info("batch limits: max_num_seqs %d, max_num_batched_tokens %d", seqs, tokens)
        return config.replace(max_num_seqs=seqs, max_num_batched_tokens=tokens)

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
            describe_quant(self.quant, str(self.dtype)),
        )
        eos = set(self.eos_token_ids)
        return ModelRunner(model, mc, self.device, self.dtype, eos, config.seed, self.kv_dtype)

    def _allocate_kv_cache(self, num_blocks: int, max_batched: int) -> None:
        """The KV cache tensors (and CUDA graphs over them), their manager, the scheduler."""
        config = self.config
        log.info(
            "KV cache: %d blocks of %d tokens, %s (%d bytes per block)",
            num_blocks,
            config.block_size,
            self.kv_dtype,
            kv_bytes_per_block(self.runner.config, config.block_size, self.kv_dtype),
        )
        self.runner.allocate_kv_cache(num_blocks, config.block_size)
        if self.tp is None:  # tensor parallel: followers replay the leader's host arrays
            self.runner.setup_step_inputs(self.max_num_seqs, self.max_model_len, config.block_size)
        progress.note(f"KV cache: {num_blocks} blocks of {config.block_size} tokens")
        if self.tp is None:  # tensor parallel: the followers' LM heads would have to join
            self.runner.warm_lm_head(self.max_num_seqs)
        if self.device.type == "cuda" and not config.enforce_eager:
            from worker.cuda_graphs import GraphShapes

            shapes = GraphShapes(
                self.max_num_seqs,
                self.max_model_len,
                config.block_size,
                config.num_speculative_tokens,
            )
            with progress.stage("capturing CUDA graphs"):
                self.runner.capture_cuda_graphs(shapes)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=max_batched,
                max_model_len=self.max_model_len,
                enable_chunked_prefill=config.enable_chunked_prefill,
                num_lookahead_tokens=config.num_speculative_tokens,
            ),
            self.kv,
        )

    def _num_kv_blocks(self, max_batched_tokens: int) -> int:
        c = self.config
        per_block = kv_bytes_per_block(self.runner.config, c.block_size, self.kv_dtype)
        if c.num_gpu_blocks is not None:
            return c.num_gpu_blocks
        if self.device.type == "cpu":
            budget = int((c.kv_cache_memory_gb or CPU_KV_CACHE_GB) * GiB)
        elif c.kv_cache_memory_gb is not None:
            budget = self._fixed_gpu_kv_budget(c.kv_cache_memory_gb, max_batched_tokens)
        else:
            budget = self.runner.profile_free_memory(
                max_batched_tokens, c.gpu_memory_utilization, self.max_num_seqs
            )
        draft = self._draft_model_config()
        if draft is not None:
            # The draft model lives in the same budget: its weights, and a KV block beside
            # each target block (plus k slots per request, see draft_extra_blocks).
            draft_block = kv_bytes_per_block(draft, c.block_size, self.dtype)
            if self.device.type == "cuda":
                budget -= param_bytes(draft, self.dtype)
            budget -= draft_extra_blocks(c) * draft_block
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
        room = self.runner.profile_free_memory(max_batched_tokens, 1.0, self.max_num_seqs)
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
    def add_request(self, req: EngineRequest, owner: bytes = b"") -> RequestOutput | None:
        """Admit a request from `owner`; an ERROR output (and nothing else changes) if it is
        invalid."""
        self._check_open()
        try:
            request = self._make_request(req, owner)
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

    def _make_request(self, req: EngineRequest, owner: bytes) -> Request:
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
        request = Request(
            req.request_id, list(prompt), params, self.eos_token_ids, req.arrival_time, owner=owner
        )
        return self.runner.kv_compressor.attach(request)  # its KV compression, if any

    def abort_requests(self, request_ids: list[str]) -> None:
        self.grammars.abort(request_ids)
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.grammars)

    def owner_of(self, request_id: str) -> bytes | None:
        """The owner of an unfinished request; None if there is no such request."""
        req = self.scheduler.requests.get(request_id) or self.grammars.get(request_id)
        return req.owner if req is not None else None

    def request_ids(self, owner: bytes | None = None) -> list[str]:
        """The unfinished requests (those waiting for a grammar too); only `owner`'s if given."""
        reqs = [*self.scheduler.requests.values(), *self.grammars.requests()]
        return [r.request_id for r in reqs if owner is None or r.owner == owner]

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        return [out for _, out in self.step_with_owners()]

    def step_with_owners(self) -> list[OwnedOutput]:
        """One step; each output with its request's owner (the worker server routes by it)."""
        self._check_open()
        if not self.grammars:  # the usual step: no grammar compiling
            return self._step()
        ready, failed = self.grammars.take_ready(wait=not self.scheduler.has_unfinished_requests())
        for request in ready:
            self.scheduler.add_request(request)
        return failed + self._step()

    def _step(self) -> list[OwnedOutput]:
        if self.stepper is not None:
            return self.stepper.step()
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        result = self.runner.execute(sched)
        return self._postprocess(sched, result)

    def _postprocess(
        self, sched: SchedulerOutput, result: StepResult, placeholders: bool = False
    ) -> list[OwnedOutput]:
        """Apply a step's results; `placeholders`: a step the scheduler advanced past
        at launch (async scheduling), whose tokens replace its placeholders."""
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
        self.runner.kv_compressor.compress_step(sched, self.kv, self.runner.kv_caches)
        apply = self.scheduler.resolve if placeholders else self.scheduler.update
        updates = apply(sched, result.new_tokens)
        # Matchers take the new tokens and fill the next masks on a thread, meanwhile.
        self.runner.masks.prefetch(updates)
        if self.proposer is not None:
            self.spec_stats.count(sched, result.new_tokens)
            set_proposals(
                self.proposer,
                [req for req, _ in updates],
                self.scheduler.running,
                self.config.num_speculative_tokens,
                self.max_model_len,
            )
        outputs: list[OwnedOutput] = []
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
            outputs.append((req.owner, out))
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
