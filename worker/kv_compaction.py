"""KV cache compression on the device: score, select, compact (torch ops).

The policy (how much each layer keeps, where new tokens go) is worker/kv_compression.py;
this module does the tensor work once a request's prefill has completed:

1. The attention backend's step kept each layer's rotated queries of the observation
   window (AttentionMetadata.capture); `KVCompressor.collect` files them per request (a
   window may span two prefill chunks).
2. `snapkv_votes`: per layer, softmax(q_window . K / sqrt(D)) under the causal mask,
   summed over the window's queries, 1-D average-pooled (kernel POOL_KERNEL), averaged
   over each KV head's query group -> one vote per cached position and KV head.
3. `select_positions`: the top votes per KV head (in position order) plus the window.
4. `compact_layer`: gather the kept K/V rows of every head, scatter them to cache indices
   0..kept-1 of the request's new blocks (KVCacheManager.compact chose them).

These are plain torch ops per request and layer: on a GPU a handful of kernels per layer
(one matmul, softmax, pooling, top-k, two gathers), fine for a step that runs once per
request; a fused kernel is future work. The cost is measured (`KVCompressor.stats`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ipc.messages import SamplingParams
from worker.attention import QueryCapture
from worker.config import EngineConfig
from worker.device_copy import host_tensor
from worker.kv_cache import KVCacheManager
from worker.kv_compression import NUM_SINKS, POOL_KERNEL, kv_compression_for
from worker.model_config import ModelConfig
from worker.request import Request, RequestStatus
from worker.scheduler import ScheduledRequest, SchedulerOutput

log = logging.getLogger(__name__)


def request_rows(
    kv_cache: torch.Tensor, kv: int, block_ids: torch.Tensor, length: int, scale: float = 1.0
) -> torch.Tensor:
    """K (kv=0) or V (kv=1) of a request's first `length` cache indices, [S, Hkv, D] fp32
    (an FP8 cache's rows times their scale, as attention reads them)."""
    nb = -(-length // kv_cache.shape[2])
    if kv_cache.dtype == torch.float8_e4m3fn:
        rows = kv_cache.view(torch.uint8)[kv, block_ids[:nb]].view(torch.float8_e4m3fn)
        rows = rows.float() * scale
    else:
        rows = kv_cache[kv, block_ids[:nb]]
    return rows.reshape(-1, kv_cache.shape[3], kv_cache.shape[4])[:length].float()


def snapkv_votes(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Votes [Hkv, S - W] of the window's queries q [W, Hq, D] (the last W positions of
    the S cached) for every earlier position of k [S, Hkv, D]."""
    w, num_q_heads, d = q.shape
    s, num_kv_heads = k.shape[0], k.shape[1]
    group = num_q_heads // num_kv_heads
    qh = q.float().view(w, num_kv_heads, group, d).permute(1, 2, 0, 3)  # [Hkv, g, W, D]
    kh = k.float().permute(1, 2, 0)[:, None]  # [Hkv, 1, D, S]
    logits = torch.matmul(qh, kh) * scale  # [Hkv, g, W, S]
    q_pos = torch.arange(s - w, s, device=q.device)[:, None]
    hidden = torch.arange(s, device=q.device)[None, :] > q_pos  # [W, S]: causal
    probs = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
    votes = probs[..., : s - w].sum(dim=2)  # [Hkv, g, S - W]
    pooled = F.avg_pool1d(
        votes.reshape(num_kv_heads * group, 1, s - w),
        POOL_KERNEL,
        stride=1,
        padding=POOL_KERNEL // 2,
    )
    return pooled.view(num_kv_heads, group, s - w).mean(dim=1)


def select_positions(votes: torch.Tensor, cached_len: int, kept: int) -> torch.Tensor:
    """Cache indices [Hkv, kept] each KV head keeps: its top kept - W votes, then the
    window (the W = cached_len - votes' width last positions), in position order."""
    num_kv_heads, candidates = votes.shape
    window = cached_len - candidates
    top = votes.topk(kept - window, dim=-1).indices.sort(dim=-1).values
    tail = torch.arange(candidates, cached_len, device=votes.device)
    return torch.cat([top, tail.expand(num_kv_heads, window)], dim=-1)


def streaming_positions(
    cached_len: int, kept: int, num_kv_heads: int, device: torch.device
) -> torch.Tensor:
    """StreamingLLM's choice [Hkv, kept]: the first NUM_SINKS tokens and the most recent."""
    keep = torch.cat(
        [
            torch.arange(NUM_SINKS, device=device),
            torch.arange(cached_len - (kept - NUM_SINKS), cached_len, device=device),
        ]
    )
    return keep.expand(num_kv_heads, kept)


def compact_layer(
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    old_ids: torch.Tensor,  # [n_old] int64: the request's blocks before
    new_ids: torch.Tensor,  # [n_new] int64: its blocks after
    keep: torch.Tensor,  # [Hkv, kept] int64: old cache indices each head keeps, in order
) -> None:
    """Move each head's kept K/V rows to cache indices 0..kept-1 of the new blocks.
    Everything is gathered before anything is written, so old and new may overlap."""
    bs, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    raw = kv_cache.view(torch.uint8) if kv_cache.dtype == torch.float8_e4m3fn else kv_cache
    flat = raw.view(2, -1, num_kv_heads, kv_cache.shape[4])  # [2, slots, Hkv, D]
    heads = torch.arange(num_kv_heads, device=keep.device)[:, None]
    src = old_ids[keep // bs] * bs + keep % bs  # [Hkv, kept] slots
    rows = flat[:, src, heads]  # [2, Hkv, kept, D]
    index = torch.arange(keep.shape[1], device=keep.device)
    dst = (new_ids[index // bs] * bs + index % bs).expand_as(src)
    flat[:, dst, heads] = rows


@dataclass
class _Window:
    """The observation window's queries captured so far for one request's prefill."""

    request: Request
    epoch: int  # the request's num_preemptions when captured (a recompute starts over)
    chunks: list[tuple[int, list[torch.Tensor]]] = field(default_factory=list)

    def queries(self, layer: int) -> torch.Tensor:  # [W, Hq, D], in position order
        return torch.cat([qs[layer] for _, qs in sorted(self.chunks, key=lambda c: c[0])])


@dataclass
class CompressionStats:
    requests: int = 0  # requests compressed
    seconds: float = 0.0  # time in compress() (device-synchronized when `timed`)
    tokens_before: int = 0  # cached tokens per layer before, summed over requests
    tokens_after: int = 0  # kept (the largest layer's), summed over requests
    skipped_no_room: int = 0  # compressions given up for lack of free blocks


class KVCompressor:
    """Owns the captured windows; compresses requests whose prefill just completed."""

    def __init__(
        self,
        num_layers: int,
        head_dim: int,
        timed: bool = False,
        k_scales: list[float] | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.scale = head_dim**-0.5
        self.k_scales = k_scales or [1.0] * num_layers  # FP8 KV caches: each layer's K scale
        self.timed = timed  # synchronize around each compression to time it (benchmarks)
        self.windows: dict[str, _Window] = {}
        self.stats = CompressionStats()
        self.config: EngineConfig | None = None  # the worker's flags (configure)
        self.model: ModelConfig | None = None

    def configure(self, config: EngineConfig, model: ModelConfig) -> None:
        """Take the worker's flags; ValueError when this model cannot compress."""
        kv_compression_for(config, model, SamplingParams())
        self.config, self.model = config, model

    @property
    def pyramid(self) -> bool:
        """Do the worker's flags ask for PyramidKV (so CUDA graphs read per-layer lengths)?"""
        return self.config is not None and self.config.kv_compression == "pyramidkv"

    def attach(self, request: Request) -> Request:
        """Give a new request its compression settings (ValueError when they are invalid)."""
        if self.config is not None and self.model is not None:
            settings = kv_compression_for(self.config, self.model, request.params)
            request.kv_compression = settings
            request.kv_compression_pending = settings is not None
        return request

    def collect(
        self,
        capture: QueryCapture | None,
        jobs: list[tuple[int, int, int]],
        scheduled: list[ScheduledRequest],
    ) -> None:
        """File a step's captured queries under their requests (jobs in row order)."""
        if capture is None or not jobs:
            return
        assert len(capture.layers) == self.num_layers, "every layer must capture its window"
        row = 0
        for sched_index, first, n in jobs:
            req = scheduled[sched_index].request
            w = self.windows.get(req.request_id)
            if w is None or w.epoch != req.num_preemptions or w.request is not req:
                w = self.windows[req.request_id] = _Window(req, req.num_preemptions)
            w.chunks.append((first, [layer[row : row + n] for layer in capture.layers]))
            row += n

    def compress_step(
        self, out: SchedulerOutput, kv: KVCacheManager, kv_caches: list[torch.Tensor]
    ) -> None:
        """Before the scheduler applies a step: compress the prefills it completed (not
        those sure to finish with this step's token: their blocks are about to go)."""
        ending = [
            sr
            for sr in out.scheduled
            if sr.request.kv_compression_pending
            and sr.samples
            and sr.request.status != RequestStatus.PREEMPTED
            and sr.request.num_output_tokens + 1 < sr.request.max_tokens
        ]  # prefills_ending's test, inline: this runs every step
        if ending:
            self.compress(ending, kv, kv_caches)

    @staticmethod
    def prefills_ending(out: SchedulerOutput) -> list[ScheduledRequest]:
        """Before the scheduler applies a step: the requests whose prefill it completes
        and that may compress (once per admission; a preempted request recompresses). Not
        one preempted since (async scheduling: by the schedule of the step after `out`)."""
        return [
            sr
            for sr in out.scheduled
            if sr.request.kv_compression_pending
            and sr.samples
            and sr.request.status != RequestStatus.PREEMPTED
        ]

    def compress(
        self, ending: list[ScheduledRequest], kv: KVCacheManager, kv_caches: list[torch.Tensor]
    ) -> None:
        """After the scheduler applied the step: compress the `ending` prefills' caches."""
        for sr in ending:
            req = sr.request
            req.kv_compression_pending = False
            window = self.windows.pop(req.request_id, None)
            if not req.is_finished and req.kv_compression is not None:
                self._compress(req, sr.end, window, kv, kv_caches)
        if self.windows:  # drop what finished, aborted or preempted requests left
            for rid in [r for r, w in self.windows.items() if w.request.is_finished]:
                del self.windows[rid]

    def _compress(
        self,
        req: Request,
        cached_len: int,
        window: _Window | None,
        kv: KVCacheManager,
        kv_caches: list[torch.Tensor],
    ) -> None:
        settings = req.kv_compression
        assert settings is not None
        kept = settings.kept_per_layer(cached_len, self.num_layers)
        if kept is None:
            return
        if settings.scores and (window is None or window.epoch != req.num_preemptions):
            log.warning("request %s: no window queries captured; not compressed", req.request_id)
            return
        top = max(kept)
        shift = None if min(kept) == top else tuple(top - k for k in kept)
        plan = kv.compact(req.request_id, cached_len, top, shift)
        if plan is None:
            self.stats.skipped_no_room += 1
            return
        t0 = self._clock(kv_caches[0].device)
        device = kv_caches[0].device
        old_ids = host_tensor(plan[0], torch.long, device)
        new_ids = host_tensor(plan[1], torch.long, device)
        for layer, cache in enumerate(kv_caches):
            if window is None or not settings.scores:
                keep = streaming_positions(cached_len, kept[layer], cache.shape[3], device)
            else:
                q = window.queries(layer)
                k = request_rows(cache, 0, old_ids, cached_len, self.k_scales[layer])
                keep = select_positions(snapkv_votes(q, k, self.scale), cached_len, kept[layer])
            compact_layer(cache, old_ids, new_ids, keep)
        s = self.stats
        s.seconds += self._clock(device) - t0
        s.requests += 1
        s.tokens_before += cached_len
        s.tokens_after += top

    def _clock(self, device: torch.device) -> float:
        if self.timed and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
