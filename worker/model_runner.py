"""Running one scheduled step: inputs -> model -> logits -> sampled tokens.

The KV cache is one tensor per layer, [2, num_blocks, block_size, Hkv, D] (see
cuda/paged_attention.py). On CPU its size comes from `kv_cache_memory_gb`; on GPU from
the memory left after a worst-case step at `gpu_memory_utilization`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cuda.prefill_tiles import TileSpec, grid_from_env
from ipc.messages import TokenLogprobs
from worker.attention import AttentionBackend, TorchAttention
from worker.grammar_masks import StepMasks
from worker.input_batch import (
    LM_HEAD_ROW_BUCKET,
    HostInputs,
    lm_head_rows,
    padded_rows,
    take_rows,
    to_device,
)
from worker.kv_compaction import KVCompressor
from worker.model_config import ModelConfig
from worker.models.base import CausalLM
from worker.models.layers import Attention
from worker.persistent_batch import InputBuilder, make_input_builder
from worker.request import Request
from worker.sampler import Sampler, SamplingBatch, compute_logprobs, plain_greedy
from worker.sampling_rows import make_sampling_rows, rebuilt_batch
from worker.scheduler import ScheduledRequest, SchedulerOutput
from worker.spec_decode.verify import verify

if TYPE_CHECKING:
    from worker.cuda_graphs import CudaGraphRunner, GraphShapes
    from worker.device_inputs import DeviceStepState

log = logging.getLogger(__name__)

# (host inputs, whether the step replays a CUDA graph, device input ids or None) -> ids
StepHook = Callable[[HostInputs, bool, "torch.Tensor | None"], "torch.Tensor | None"]


@dataclass
class StepResult:
    new_tokens: list[list[int]]  # per scheduled request (empty when it did not sample)
    logprobs: list[list[TokenLogprobs]]  # per scheduled request, one per new token if asked
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # by index


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem


def make_backend(device: torch.device) -> AttentionBackend:
    if device.type == "cuda":
        try:
            from worker.cuda_attention import CudaAttention
        except ImportError as e:  # kernels unavailable: correct but slow
            log.warning("CUDA attention kernels unavailable (%s); using the torch reference", e)
        else:
            return CudaAttention()
    return TorchAttention()


def prefill_tile_spec(config: ModelConfig, device: torch.device) -> TileSpec | None:
    """What the step's tile map is cut for under HEADRACE_PREFILL_GRID=flat on a GPU, else
    None. The variable is parsed on every device, so a bad value fails at startup."""
    if grid_from_env() != "flat" or device.type != "cuda":
        return None
    from cuda import prefill_v2

    return prefill_v2.tile_spec(config.num_heads, config.num_kv_heads)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        model_config: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        eos_token_ids: set[int],
        seed: int = 0,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.config = model_config
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype  # float8_e4m3fn for --kv-cache-dtype fp8
        self.sampler = Sampler(model_config.vocab_size, eos_token_ids, seed=seed)
        # Sampling params and penalty counts kept per row across steps, or rebuilt every
        # step (HEADRACE_SAMPLING_BATCH=rebuild; worker/sampling_rows.py).
        self.sampling_rows = make_sampling_rows(model_config.vocab_size, eos_token_ids, device)
        self.kv_caches: list[torch.Tensor] = []
        self.graph_runner: CudaGraphRunner | None = None
        # Speculative decoding: request id -> draft distributions q [k, V] (the draft
        # proposer's dict; empty for n-gram, whose q is a point mass).
        self.draft_probs: dict[str, torch.Tensor] = {}
        # KV cache compression: captured observation windows, and the compaction itself.
        k_scales = [m.k_scale for m in model.modules() if isinstance(m, Attention)]
        self.kv_compressor = KVCompressor(
            model_config.num_layers, model_config.head_dim, k_scales=k_scales or None
        )
        # Structured output: each step's grammar masks, filled while the forward runs.
        self.masks = StepMasks(model_config.vocab_size, device)
        # Step inputs: the persistent input batch, or every row rebuilt each step
        # (HEADRACE_INPUT_BATCH=rebuild; worker/persistent_batch.py).
        self.build_inputs: InputBuilder = make_input_builder()
        # HEADRACE_STEP_INPUTS=numba: decode steps' inputs computed on the device from a
        # persistent device state (worker/device_inputs.py); set by setup_step_inputs.
        self.device_state: DeviceStepState | None = None
        # Tensor-parallel leader: publishes each forward to the followers before running
        # it (worker/parallel/leader.py); returns the input ids every rank then uses.
        self.step_hook: StepHook | None = None
        # HEADRACE_PREFILL_GRID=flat: eager steps with q_len > 1 carry prefill round 2's
        # tile map (cuda/prefill_tiles.py), cut for this model's group (None: the z grid).
        self.prefill_tiles = prefill_tile_spec(model_config, device)
        # Eager steps that carried a tile map: what `bench throughput` reports, so a run
        # says whether the flat grid was on (the env of a past run is not in its JSON).
        self.prefill_tile_steps = 0

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        c = self.config
        shape = (2, num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.kv_caches = [
            # Uninitialized: attention reads only slots a request has written.
            torch.empty(shape, dtype=self.kv_dtype, device=self.device)
            for _ in range(c.num_layers)
        ]

    def release(self) -> None:
        """Free the device memory this runner holds: the CUDA graphs (so their pool can be
        returned), the KV cache and the weights. It runs no steps afterwards."""
        from worker.release import release_model

        if self.graph_runner is not None:
            self.graph_runner.release()
            self.graph_runner = None
        self.kv_caches.clear()  # the list the models and graphs were handed
        self.kv_caches = []
        self.draft_probs.clear()
        release_model(self.model)

    def setup_step_inputs(self, max_num_seqs: int, max_model_len: int, block_size: int) -> None:
        """Under HEADRACE_STEP_INPUTS=numba, the device state decode steps are built from
        (before capture_cuda_graphs: the decode graphs then contain the kernels)."""
        from worker.device_inputs import DeviceInputBatch, DeviceStepState, step_inputs_mode

        if step_inputs_mode() != "numba":
            return
        if self.kv_compressor.pyramid:
            log.warning(
                "HEADRACE_STEP_INPUTS=numba: PyramidKV's per-layer lengths keep the host path"
            )
            return
        width = -(-max_model_len // block_size)
        self.device_state = DeviceStepState(max_num_seqs, width, block_size, self.device)
        self.build_inputs = DeviceInputBatch(
            self.device_state, self.build_inputs, lambda: self.step_hook is None
        ).build

    def capture_cuda_graphs(self, shapes: GraphShapes) -> None:
        """Capture graphs (GPU only); after this, steps whose requests each compute one
        token (decode), or at most 1 + num_speculative_tokens (verification), replay them
        (and PyramidKV's per-layer lengths, when the worker compresses with it)."""
        from worker.cuda_graphs import capture_graphs

        if self.kv_compressor.pyramid:
            shapes = dataclasses.replace(shapes, per_layer_lengths=True)
        self.graph_runner = capture_graphs(
            self.model, self.kv_caches, self.dtype, shapes, state=self.device_state
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        host = self.build_inputs(out)
        token_ids = self.greedy_step(out, host)
        if token_ids is not None:
            tokens = token_ids.tolist()  # the step's one host sync
            return StepResult([[int(t)] for t in tokens], [[] for _ in tokens])
        return self.sample(out, host, self.forward(host, scheduled=out.scheduled))

    def greedy_step(
        self, out: SchedulerOutput, host: HostInputs, input_ids: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Token ids [B] (device) of a decode step whose rows are all plain greedy, from one
        replay of the graph that ends in the argmax; None: the step takes the usual path
        (graph or eager forward, then compute_logits and the sampler)."""
        g = self.graph_runner
        if g is None or self.step_hook is not None or not self._plain_decode(out):
            return None
        for sr in out.scheduled:
            r = sr.request
            if r.grammar is not None or not plain_greedy(r.params, len(r.output_token_ids)):
                return None
        if not g.can_run_greedy(host):
            return None
        return g.run_greedy(host, input_ids)

    def sampled_logits(
        self, hidden: torch.Tensor, rows: list[int], reqs: list[Request]
    ) -> torch.Tensor:
        """Logits [S, V] of hidden's `rows`, the ones `reqs` sample from: the model's 16-bit
        LM head output when every row is plain greedy (the sampler then argmaxes them as
        they are, no fp32 copy), else fp32 compute_logits. Either gives the sampler the
        same values. On the GPU the LM head runs over lm_head_rows(S) rows (padded_rows)."""
        if hidden.is_cuda:
            rows = padded_rows(rows, hidden.shape[0])
        x = take_rows(hidden, rows)
        if all(r.grammar is None and plain_greedy(r.params, len(r.output_token_ids)) for r in reqs):
            return self.model.greedy_logits(x)[: len(reqs)]
        return self.model.compute_logits(x)[: len(reqs)]

    @torch.inference_mode()
    def warm_lm_head(self, max_rows: int) -> None:
        """Run the eager LM head at every row count sampled_logits can give up to
        `max_rows` sampled rows, while the GPU is idle: the first GEMM of a row count may
        wait for the GPU to drain, and inside a step that wait stalls the host.
        compute_logits runs the same lm_head GEMM as greedy_logits (CausalLM), so it alone
        warms both."""
        if self.device.type != "cuda":
            return
        t0 = time.perf_counter()
        n = lm_head_rows(max_rows)
        x = torch.zeros((n, self.config.hidden_size), dtype=self.dtype, device=self.device)
        for b in range(LM_HEAD_ROW_BUCKET, n + 1, LM_HEAD_ROW_BUCKET):
            self.model.compute_logits(x[:b])
        torch.cuda.synchronize(self.device)
        log.info(
            "LM head warmed at %d row counts in %.2fs",
            n // LM_HEAD_ROW_BUCKET,
            time.perf_counter() - t0,
        )

    @staticmethod
    def _plain_decode(out: SchedulerOutput) -> bool:
        """Every request computes and samples one token (no speculation, no prompt
        logprobs, no prefill that compresses its KV cache before the next step)."""
        return all(
            sr.num_new_tokens == 1
            and sr.num_spec_tokens == 0
            and sr.samples
            and not sr.request.wants_prompt_logprobs
            and not sr.request.kv_compression_pending
            for sr in out.scheduled
        )

    def forward(
        self,
        host: HostInputs,
        input_ids: torch.Tensor | None = None,
        scheduled: list[ScheduledRequest] | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, H] of a step: its CUDA graph replayed, or the model eagerly.
        `input_ids` (device) replaces the host's ids (async scheduling's chained step);
        `scheduled` receives the KV-compression windows the step captured."""
        use_graph = self.graph_runner is not None and self.graph_runner.can_run(host)
        if self.step_hook is not None:  # tensor parallel: the followers run it too
            input_ids = self.step_hook(host, use_graph, input_ids)
        return self.run_forward(host, use_graph, input_ids, scheduled)

    def run_forward(
        self,
        host: HostInputs,
        use_graph: bool,
        input_ids: torch.Tensor | None,
        scheduled: list[ScheduledRequest] | None = None,
    ) -> torch.Tensor:
        if use_graph:
            assert self.graph_runner is not None
            if input_ids is None:
                return self.graph_runner.run(host)
            return self.graph_runner.run(host, input_ids)
        if host.device is not None:
            assert self.device_state is not None
            inputs = self.device_state.eager_inputs(host)
        else:
            inputs = to_device(host, self.device, self.prefill_tiles)
            split = inputs.md.decode_split
            md = inputs.md if split is None else split.prefill
            self.prefill_tile_steps += md.prefill_tiles is not None
        ids = inputs.input_ids if input_ids is None else input_ids
        hidden = self.model(ids, inputs.positions, self.kv_caches, inputs.md)
        if scheduled is not None:
            self.kv_compressor.collect(inputs.md.capture, host.capture_jobs, scheduled)
        return hidden

    def sample(self, out: SchedulerOutput, inputs: HostInputs, hidden: torch.Tensor) -> StepResult:
        n = len(out.scheduled)
        new_tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[TokenLogprobs]] = [[] for _ in range(n)]
        result = StepResult(new_tokens, logprobs)
        # Requests with proposals verify their 1 + k rows; the others sample their one row.
        spec = [j for j, r in enumerate(inputs.sample_rows) if len(r) > 1]
        if spec:
            sched_index = [inputs.sample_sched_index[j] for j in spec]
            spec_reqs = [out.scheduled[i].request for i in sched_index]
            spec_rows = [inputs.sample_rows[j] for j in spec]
            bitmask = self.masks.bitmask(
                [
                    (r, r.spec_token_ids[: len(rows) - 1])
                    for r, rows in zip(spec_reqs, spec_rows, strict=True)
                ]
            )
            spec_tokens, spec_lps = verify(
                self.model, self.sampler, spec_reqs, spec_rows, hidden, self.draft_probs, bitmask
            )
            for i, t, lp in zip(sched_index, spec_tokens, spec_lps, strict=True):
                new_tokens[i], logprobs[i] = t, lp
        plain = [j for j, r in enumerate(inputs.sample_rows) if len(r) == 1]
        if plain:
            rows = [inputs.sample_rows[j][0] for j in plain]
            reqs = [out.scheduled[inputs.sample_sched_index[j]].request for j in plain]
            logits = self.sampled_logits(hidden, rows, reqs)  # [S, V]
            batch = self.sampling_batch(reqs, None, self.masks.bitmask([(r, []) for r in reqs]))
            sampled = self.sampler(logits, batch)
            tokens = sampled.token_ids.tolist()
            lps = None
            if sampled.logprobs is not None:
                lps = sampled.logprobs.to_lists([r.params.logprobs or 0 for r in reqs])
            for j, i in enumerate(inputs.sample_sched_index[j] for j in plain):
                new_tokens[i] = [int(tokens[j])]
                if lps is not None and reqs[j].params.logprobs is not None:
                    logprobs[i] = [lps[j]]
        for job in inputs.prompt_logprobs:
            req = out.scheduled[job.sched_index].request
            k = req.params.prompt_logprobs or 0
            logits = self.model.compute_logits(take_rows(hidden, job.rows))
            targets = torch.tensor(job.targets, device=logits.device)
            lp = compute_logprobs(logits, targets, k).to_lists([k] * len(job.rows))
            result.prompt_logprobs[job.sched_index] = lp
        return result

    def sampling_batch(
        self, reqs: list[Request], steps: list[int] | None, bitmask: torch.Tensor | None
    ) -> SamplingBatch:
        """The sampling inputs of one sampled row per request, in `reqs`' order."""
        if self.sampling_rows is None:
            return rebuilt_batch(reqs, steps, bitmask)
        return self.sampling_rows.batch(reqs, steps, bitmask)

    @torch.inference_mode()
    def profile_free_memory(
        self, max_num_batched_tokens: int, utilization: float, max_num_seqs: int = 256
    ) -> int:
        """Bytes left for the KV cache after a worst-case step, within `utilization`.

        Runs one prefill of `max_num_batched_tokens` tokens against a one-block scratch
        cache (all tokens' slots point at it: the values are garbage, the peak is real),
        and the LM head over as many rows as a step samples at most (`max_num_seqs`).
        """
        from worker.attention import AttentionMetadata

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        c = self.config
        T = max_num_batched_tokens
        block = 16
        scratch = [
            torch.zeros(
                (2, 1, block, c.num_kv_heads, c.head_dim), dtype=self.kv_dtype, device=self.device
            )
            for _ in range(c.num_layers)
        ]
        # One request of T tokens reading one block: the attention reads stay tiny, while
        # the matmul activations (the real peak) are full size.
        md = AttentionMetadata(
            query_start_loc=torch.tensor([0, T], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([min(T, block)], dtype=torch.int32, device=self.device),
            block_tables=torch.zeros((1, 1), dtype=torch.int32, device=self.device),
            slot_mapping=torch.arange(T, device=self.device) % block,
            max_query_len=T,
            max_seq_len=min(T, block),
        )
        ids = torch.zeros(T, dtype=torch.long, device=self.device)
        pos = torch.arange(T, device=self.device) % block
        hidden = self.model(ids, pos, scratch, md)
        self.model.compute_logits(hidden[-min(T, max_num_seqs) :])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del scratch, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = int(total * utilization) - peak - max(used_by_others, 0)
        log.info("KV cache budget %.2f GiB (peak step %.2f GiB)", budget / 2**30, peak / 2**30)
        return budget
