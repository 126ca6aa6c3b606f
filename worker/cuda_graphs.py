"""CUDA graphs for decode and verification steps, replayed with new inputs.

Two families of graphs, one per bound on q_len, each with one graph per batch bucket:

    q = 1       decode steps: every request computes one token (decode kernels)
    q = 1 + k   speculative steps: every request computes at most 1 + k tokens, its last
                token plus up to k proposals (the tensor-core prefill kernel, whose grid
                depends only on q, the KV heads and the batch)

A step of B requests whose longest q_len is Q runs the graph of the smallest family with
q >= Q and the smallest bucket >= B. Inputs live in static buffers sized for the largest
graph; a request's rows are its own (fewer proposals simply mean fewer rows), and what is
left is padding (worker/input_batch.py pad_inputs):

    input_ids / positions   [T real | stale ...]      (results never read)
    slot_mapping            [T real | -1 ...]         (-1: the KV write skips the row)
    query_start_loc         [B real + 1 | T T ...]    (padding requests have q_len 0)
    seq_lens                [B real | 0 ...]          (kernels exit early on 0)
    block_tables            [B rows | stale ...]
    layer seq_lens / slots  [L, ...] the same per layer (--kv-compression pyramidkv only)

So requests with fewer than k proposals (or none) need no filler tokens, and the rejection
sampler sees exactly the proposals it would see eagerly. The graphs are captured largest
first into one shared memory pool, with the seq_len bound fixed at max_model_len, so
replaying at longer contexts than at capture stays right.

Greedy decode graphs: for decode buckets up to GREEDY_MAX_BS (and a model whose LM head is
one local nn.Linear, not tensor parallel) a second graph per bucket goes on past the hidden
states through the LM head and the argmax (worker/sampler.py argmax_tokens), so a step
whose rows are all plain greedy (sampler.plain_greedy, no grammar) is one replay that gives
token ids: no eager lm_head, cast, copy and argmax launches after it. The argmax reads the
head's 16-bit output (CausalLM.greedy_logits): no fp32 copy of the logits in the graph.

HEADRACE_STEP_INPUTS=numba (worker/device_inputs.py): the q = 1 graphs (greedy ones too)
begin with the Numba step-input kernels, which write positions, slot mapping, query starts
and seq_lens from the device state; the block-table buffer is the state's own. A decode
step then copies only its input ids (none with async scheduling's fed ids) before the replay.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cuda.step_fusion import step_fusion
from worker import progress
from worker.attention import AttentionMetadata
from worker.input_batch import HostInputs, PaddedInputs, pad_inputs
from worker.models.base import CausalLM
from worker.sampler import argmax_tokens

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

    from worker.device_inputs import DeviceStepState

log = logging.getLogger(__name__)

GREEDY_MAX_BS = 64  # largest decode bucket with a greedy graph (its logits: bs x V, model dtype)


MAX_GRAPH_BS = 1024  # larger steps run eagerly (their launches are < 3% of such a step)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: every 16 up to 256, then every 32 up to 1024 (a step
    of that many rows is compute-bound in its GEMMs, so padding costs its share), and
    max_num_seqs itself. 44 graphs at 1024 (vLLM stops at 512 and runs larger steps eagerly;
    ours would then pay the eager host path, not only the launches)."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(288, MAX_GRAPH_BS + 1, 32)]
    top = min(max_num_seqs, MAX_GRAPH_BS)
    out = [s for s in sizes if s < top] + [top]
    return sorted(set(out))


def query_bounds(num_speculative_tokens: int) -> list[int]:
    """The q_len bound of each graph family: decode, and 1 + k when speculating."""
    return [1] if num_speculative_tokens <= 0 else [1, 1 + num_speculative_tokens]


def pick_graph(
    bounds: list[int], buckets: list[int], num_reqs: int, max_query_len: int
) -> tuple[int, int] | None:
    """(q bound, batch bucket) of the graph that runs this step; None: run it eagerly."""
    q = next((b for b in bounds if b >= max_query_len), None)
    bs = next((s for s in buckets if s >= num_reqs), None)
    if q is None or bs is None or max_query_len < 1:
        return None
    return q, bs


@dataclass(frozen=True)
class GraphShapes:
    """The steps a set of graphs covers."""

    max_num_seqs: int  # requests per step at most: the largest batch bucket
    max_model_len: int  # the seq_len bound the graphs are captured with
    block_size: int  # tokens per KV block (block tables are max_model_len / block_size wide)
    num_speculative_tokens: int = 0  # k > 0: a q = 1 + k family beside decode's q = 1
    per_layer_lengths: bool = False  # the graphs also read PyramidKV's per-layer lengths

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_model_len", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CUDA graphs: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_speculative_tokens < 0:
            raise ValueError(
                f"CUDA graphs: num_speculative_tokens must be >= 0, "
                f"got {self.num_speculative_tokens}"
            )


def capture_graphs(
    model: CausalLM,
    kv_caches: list[torch.Tensor],
    dtype: torch.dtype,
    shapes: GraphShapes,
    what: str = "decode",
    greedy: bool = True,
    state: DeviceStepState | None = None,
) -> CudaGraphRunner | None:
    """A CudaGraphRunner with its graphs captured; None (and a warning) when the model's
    attention cannot run inside a graph, so `what` runs eagerly. `greedy`: also the greedy
    decode graphs (a model whose tokens the engine samples; not a draft model)."""
    from worker.cuda_attention import CudaAttention

    c = model.config
    blocker = CudaAttention.graph_blocker(c.head_dim, dtype, c.sliding_window)
    blocker = blocker or model.graph_blocker(dtype)
    if blocker is not None:
        log.warning("CUDA graphs off: %s; %s runs eagerly", blocker, what)
        return None
    runner = CudaGraphRunner(model, kv_caches, shapes, greedy, state)
    if shapes.per_layer_lengths:
        t = runner.max_bs * runner.bounds[-1]
        runner.layers = LayerInputs(len(kv_caches), runner.max_bs, t, runner.device)
    runner.capture()
    return runner


class LayerInputs:
    """PyramidKV's per-layer seq_lens [L, n] and slot_mapping [L, t] as graph inputs (when
    the worker compresses with pyramidkv): steps without such requests copy the shared
    lengths and slots into every layer's row on the device."""

    def __init__(
        self, num_layers: int, n: int, t: int, device: torch.device, pin: bool = True
    ) -> None:
        self.seq_lens = torch.zeros((num_layers, n), dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((num_layers, t), -1, dtype=torch.int64, device=device)
        self._staging = [
            (
                torch.zeros((num_layers, n), dtype=torch.int32, pin_memory=pin),
                torch.zeros((num_layers, t), dtype=torch.int64, pin_memory=pin),
            )
            for _ in range(2)
        ]
        self._turn = 0

    def write(
        self, host: HostInputs, seq_lens: torch.Tensor, slots: torch.Tensor, bs: int, n: int
    ) -> None:
        """This step's rows: the host's per-layer arrays padded as pad_inputs pads, else the
        shared device buffers `seq_lens` [bs] and `slots` [n] (already this step's)."""
        if host.layer_seq_lens is None or host.layer_slot_mapping is None:
            self.seq_lens[:, :bs].copy_(seq_lens[:bs].expand(self.seq_lens.shape[0], -1))
            self.slot_mapping[:, :n].copy_(slots[:n].expand(self.slot_mapping.shape[0], -1))
            return
        lsl, lsm = self._staging[self._turn]
        self._turn ^= 1
        b, t = host.layer_seq_lens.shape[1], host.layer_slot_mapping.shape[1]
        lsl_np, lsm_np = lsl.numpy(), lsm.numpy()
        lsl_np[:, :b] = host.layer_seq_lens
        lsl_np[:, b:bs] = 0
        lsm_np[:, :t] = host.layer_slot_mapping
        lsm_np[:, t:n] = -1
        self.seq_lens[:, :bs].copy_(lsl[:, :bs], non_blocking=True)
        self.slot_mapping[:, :n].copy_(lsm[:, :n], non_blocking=True)


class CudaGraphRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        shapes: GraphShapes,
        greedy: bool = True,
        state: DeviceStepState | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = bucket_sizes(shapes.max_num_seqs)
        self.bounds = query_bounds(shapes.num_speculative_tokens)
        self.max_bs = self.buckets[-1]
        self.max_model_len = shapes.max_model_len
        self.max_blocks = -(-shapes.max_model_len // shapes.block_size)
        # The cache's device (the graphs run where the KV cache lives).
        self.device = device = kv_caches[0].device
        n, t = self.max_bs, self.max_bs * self.bounds[-1]
        i32, i64 = torch.int32, torch.int64
        # Device buffers the graphs read, and pinned host twins they are refilled from.
        self.input_ids = torch.zeros(t, dtype=i64, device=device)
        self.positions = torch.zeros(t, dtype=i64, device=device)
        self.slot_mapping = torch.full((t,), -1, dtype=i64, device=device)
        self.query_start_loc = torch.zeros(n + 1, dtype=i32, device=device)
        self.seq_lens = torch.zeros(n, dtype=i32, device=device)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=i32, device=device)
        # HEADRACE_STEP_INPUTS=numba: the q = 1 graphs compute their inputs from `state`.
        self.state = state
        self._nb_outputs: dict[int, Any] = {}  # bucket -> the kernels' view of its buffers
        if state is not None:
            if state.rows < n or state.width != self.max_blocks:
                raise ValueError(
                    f"device state {state.rows}x{state.width} under graphs {n}x{self.max_blocks}"
                )
            self.block_tables = state.block_tables[:n]
        # Two sets of pinned staging buffers, used in turn: with async scheduling the next
        # step's inputs are written while this step's host-to-device copies may still be
        # queued behind the step before it.
        self._staging = [self._make_staging(n, t) for _ in range(2)]
        self._turn = 0
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (q bound, bucket)
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.replays = dict.fromkeys(self.bounds, 0)  # per q bound: steps that replayed
        self.layers: LayerInputs | None = None  # PyramidKV's per-layer lengths, if captured
        # Greedy decode graphs by bucket, and their token ids [bs] int64.
        self.greedy = greedy and isinstance(model.lm_head, nn.Linear) and step_fusion()
        self.greedy_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.greedy_outputs: dict[int, torch.Tensor] = {}
        self.greedy_replays = 0  # decode steps that replayed a greedy graph (also in replays)

    def _make_staging(
        self, n: int, t: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PaddedInputs]:
        h64_t = torch.zeros((3, t), dtype=torch.int64, pin_memory=True)
        h32_t = torch.zeros(2 * n + 1, dtype=torch.int32, pin_memory=True)
        hbt_t = torch.zeros((n, self.max_blocks), dtype=torch.int32, pin_memory=True)
        h64, h32 = h64_t.numpy(), h32_t.numpy()
        padded = PaddedInputs(h64[0], h64[1], h64[2], h32[: n + 1], h32[n + 1 :], hbt_t.numpy())
        return h64_t, h32_t, hbt_t, padded

    def _md(self, q: int, bs: int) -> AttentionMetadata:
        md = AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[: bs * q],
            max_query_len=q,
            max_seq_len=self.max_model_len,
        )
        if self.layers is not None:
            md.layer_seq_lens = self.layers.seq_lens[:, :bs]
            md.layer_slot_mapping = self.layers.slot_mapping[:, : bs * q]
        return md

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Largest first: later ones reuse its pool.
            shapes = [(q, bs) for q in reversed(self.bounds) for bs in reversed(self.buckets)]
            for q, bs in progress.bar(shapes, len(shapes), "graphs"):
                # Capture-time inputs: every request q tokens long in block 0, writes skipped.
                qsl = torch.arange(self.max_bs + 1, dtype=torch.int32, device=self.device) * q
                self.query_start_loc.copy_(qsl)
                self.seq_lens.fill_(q)
                self.slot_mapping.fill_(-1)
                if self.layers is not None:
                    self.layers.seq_lens.fill_(q)
                    self.layers.slot_mapping.fill_(-1)
                md = self._md(q, bs)
                ids, pos = self.input_ids[: bs * q], self.positions[: bs * q]
                args = (ids, pos, self.kv_caches, md)
                for _ in range(2):  # warm up: compile kernels, size workspaces, autotune
                    self._model_step(q, bs, args)
                graph = torch.cuda.CUDAGraph()
                self._prepare(q, bs)
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[q, bs] = self._model_step(q, bs, args, prepare=False)
                self.graphs[q, bs] = graph
                if q == 1 and self.greedy and bs <= GREEDY_MAX_BS:
                    self._capture_greedy(bs, args, pool, stream)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self.state is not None:
            self.state.forget()  # capture left its own rows there
        torch.cuda.synchronize(self.device)
        log.info("captured %d CUDA graphs in %.1fs", len(self.graphs), time.perf_counter() - t0)

    def _prepare(self, q: int, bs: int) -> None:
        if self.state is not None and q == 1:
            self.state.prepare_capture(bs, q)

    def _model_step(self, q: int, bs: int, args: tuple, prepare: bool = True) -> torch.Tensor:
        """The model on a graph's buffers, after the step-input kernels in numba mode (q = 1).
        `prepare`: reset the state first (warm-ups; never inside a capture, or each replay
        would reset it: the kernels advance num_computed)."""
        if self.state is not None and q == 1:
            if prepare:
                self._prepare(q, bs)
            out = self._nb_outputs.get(bs)
            if out is None:  # converted at the first warm-up, never inside a capture
                out = self._nb_outputs[bs] = self.state.graph_outputs(
                    self.query_start_loc[: bs + 1],
                    self.seq_lens[:bs],
                    self.positions[: bs * q],
                    self.slot_mapping[: bs * q],
                )
            self.state.launch(out, bs)
        return self.model(*args)

    def _greedy_tail(self, hidden: torch.Tensor, bs: int) -> torch.Tensor:
        return argmax_tokens(self.model.greedy_logits(hidden[:bs]), self.model.config.vocab_size)

    def _capture_greedy(
        self, bs: int, args: tuple, pool: _POOL_HANDLE, stream: torch.cuda.Stream
    ) -> None:
        self._greedy_tail(self._model_step(1, bs, args), bs)  # warm up the LM head's GEMM
        graph = torch.cuda.CUDAGraph()
        self._prepare(1, bs)
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            hidden = self._model_step(1, bs, args, prepare=False)
            self.greedy_outputs[bs] = self._greedy_tail(hidden, bs)
        self.greedy_graphs[bs] = graph

    def release(self) -> None:
        """Destroy the graphs, their outputs and the KV list they read (EngineCore.shutdown).

        The shared pool's memory goes back to the caching allocator only once no graph
        captured into it is alive; `torch.cuda.empty_cache()` then returns it to the card.
        """
        for graph in [*self.graphs.values(), *self.greedy_graphs.values()]:
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()
        self.greedy_graphs.clear()
        self.greedy_outputs.clear()
        self.kv_caches = []

    def _pick(self, host: HostInputs) -> tuple[int, int] | None:
        if host.block_tables.shape[1] > self.max_blocks:
            return None
        if host.max_query_len == 1 and host.prompt_logprobs:
            return None  # a one-token prompt's logprobs: rare, eager keeps it simple
        if host.capture_rows:
            return None  # KV compression's window capture: prefill steps, eager anyway
        if host.layer_seq_lens is not None and self.layers is None:
            return None  # PyramidKV's per-layer lengths, not captured in these graphs
        key = pick_graph(self.bounds, self.buckets, len(host.seq_lens), host.max_query_len)
        if key is not None and key[0] == 1 and self.state is not None and host.device is None:
            return None  # numba mode: the q = 1 graphs' kernels would overwrite host inputs
        return key

    def can_run(self, host: HostInputs) -> bool:
        return self._pick(host) is not None

    def can_run_greedy(self, host: HostInputs) -> bool:
        """Whether a greedy decode graph fits this step (its rows' params are the caller's)."""
        key = self._pick(host)
        return key is not None and key[0] == 1 and key[1] in self.greedy_graphs

    def run(self, host: HostInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the step's graph on its inputs; returns hidden states [T, H].

        `input_ids` (on the device) replaces the host's token ids: async scheduling feeds
        the previous step's sampled tokens straight from the GPU.
        """
        q, bs = self._stage(host, input_ids)
        self.graphs[q, bs].replay()
        self.replays[q] += 1
        return self.outputs[q, bs][: host.num_tokens]

    def run_greedy(self, host: HostInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the step's greedy decode graph (check can_run_greedy first); returns the
        argmax token of each request [B] int64, a copy: the next replay overwrites the
        graph's own buffer while a chained step may still read these."""
        q, bs = self._stage(host, input_ids)
        self.greedy_graphs[bs].replay()
        self.replays[q] += 1
        self.greedy_replays += 1
        return self.greedy_outputs[bs][: len(host.seq_lens)].clone()

    def _stage(self, host: HostInputs, input_ids: torch.Tensor | None) -> tuple[int, int]:
        """Copy the step's inputs into the graphs' buffers; returns its (q bound, bucket)."""
        key = self._pick(host)
        if key is None:
            raise ValueError("no CUDA graph fits this step (check can_run first)")
        q, bs = key
        b, t, n = len(host.seq_lens), host.num_tokens, bs * q
        h64, h32, hbt, padded = self._staging[self._turn]
        self._turn ^= 1
        if host.device is not None:  # numba mode: the graph's kernels make the rest
            assert self.state is not None and q == 1
            self.state.apply(host.device)
            if input_ids is None:
                padded.input_ids[:t] = host.input_ids
                self.input_ids[:t].copy_(h64[0, :t], non_blocking=True)
            else:
                self.input_ids[:t].copy_(input_ids)
            return q, bs
        if self.state is not None:
            self.state.forget_tables()  # the copy below writes rows of its block table
        pad_inputs(host, padded, bs, n)
        width = host.block_tables.shape[1]
        if input_ids is None:
            self.input_ids[:t].copy_(h64[0, :t], non_blocking=True)
        else:
            self.input_ids[:t].copy_(input_ids)
        self.positions[:t].copy_(h64[1, :t], non_blocking=True)
        self.slot_mapping[:n].copy_(h64[2, :n], non_blocking=True)
        self.query_start_loc[: bs + 1].copy_(h32[: bs + 1], non_blocking=True)
        seq = h32[self.max_bs + 1 :]
        self.seq_lens[:bs].copy_(seq[:bs], non_blocking=True)
        self.block_tables[:b, :width].copy_(hbt[:b, :width], non_blocking=True)
        if self.layers is not None:
            self.layers.write(host, self.seq_lens, self.slot_mapping, bs, n)
        return q, bs
