"""Draft-model proposer: a small model sharing the target's vocabulary guesses k tokens.

The draft runs in the target's process with its own weights, its own paged KV cache
tensors and its own block tables (a KVCacheManager without prefix caching). Per request it
remembers the tokens whose KV it holds:

    request tokens  t0 t1 t2 t3 t4 | a1 b            (a1 accepted, b the bonus token)
    draft holds     t0 t1 t2 t3 t4 | a1 a2           (fed last step: its own proposals)
    common prefix   ---------------- 6 -> keep 6, feed [b], then propose x1..xk

Each step is one forward over every request's catch-up tokens (a whole prompt for a new
request) that yields proposal 1, then k - 1 single-token forwards. Proposals are the
draft's argmax for greedy requests, else draws from its processed distribution q, kept
for rejection sampling. Requests that stopped running (finished, aborted, preempted) have
their blocks freed at the next step; a preempted one catches up from scratch.

On a GPU the draft's steps replay CUDA graphs of its own (worker/cuda_graphs.py), as the
target's decode does: a catch-up feed is one or two tokens per request once it is in
decode (the bonus token, plus the last proposal when all k were accepted), so the graph
families are q = 1 and q = 2. Catching up on a prompt runs eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from ipc.model_folder import ModelFiles, ModelLoadError, open_model
from worker.config import EngineConfig
from worker.input_batch import HostBatch, take_rows, to_device
from worker.kv_cache import KVCacheManager
from worker.model_config import ModelConfig
from worker.model_loader import build_model
from worker.model_runner import make_backend
from worker.request import Request
from worker.sampler import GREEDY_EPS, Sampler, SamplingBatch
from worker.spec_decode import Target, draft_extra_blocks
from worker.spec_decode.verify import DRAFT_SALT

if TYPE_CHECKING:
    from worker.cuda_graphs import CudaGraphRunner

log = logging.getLogger(__name__)


@dataclass
class _DraftSeq:
    """What the draft holds for one request; quacks like a Request for KVCacheManager."""

    request_id: str
    tokens: list[int] = field(default_factory=list)  # tokens whose KV the draft cache holds

    @property
    def num_computed_tokens(self) -> int:
        return len(self.tokens)


def open_draft_model(path: str, load_format: str) -> ModelFiles:
    """open_model, with errors that say they are about the draft model."""
    try:
        return open_model(path, load_format)
    except ModelLoadError as e:
        raise ModelLoadError(f"speculative_model: {e}") from e


class DraftProposer:
    def __init__(self, config: EngineConfig, target: Target) -> None:
        """The draft model `config.speculative_model`, with as many KV blocks as the target
        plus k slots per request (draft_extra_blocks)."""
        assert config.speculative_model is not None  # EngineConfig.validate
        path = config.speculative_model
        dummy = config.load_format == "dummy"
        files = open_draft_model(path, "dummy" if dummy else "auto")
        mc = ModelConfig.from_hf(files.config, source=files.path)
        if mc.vocab_size != target.config.vocab_size:
            raise ValueError(
                f"speculative_model {path} has vocab size {mc.vocab_size}, but the target "
                f"has {target.config.vocab_size}; a draft model must share the target's vocabulary"
            )
        self.config = mc
        self.device = device = target.device
        self.dtype = dtype = target.dtype
        self.max_model_len = target.max_model_len
        self.model = build_model(
            files, mc, make_backend(device), target.max_model_len, device, dtype, dummy, config.seed
        )
        num_blocks = target.num_blocks + draft_extra_blocks(config)
        self.kv = KVCacheManager(num_blocks, config.block_size, enable_caching=False)
        shape = (2, num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [
            torch.empty(shape, dtype=dtype, device=device) for _ in range(mc.num_layers)
        ]
        self.sampler = Sampler(mc.vocab_size, set(target.eos_token_ids), seed=config.seed + 1)
        self.seqs: dict[str, _DraftSeq] = {}
        self.draft_probs: dict[str, torch.Tensor] = {}  # request id -> q [k, V] of its proposals
        self.graph_runner: CudaGraphRunner | None = None

    def capture_cuda_graphs(self, max_num_seqs: int) -> None:
        """Graphs for the draft's one- and two-token-per-request steps (GPU only)."""
        from worker.cuda_graphs import GraphShapes, capture_graphs

        # The q = 2 family: the bonus token + the last proposal.
        shapes = GraphShapes(max_num_seqs, self.max_model_len, self.kv.block_size, 1)
        self.graph_runner = capture_graphs(
            self.model, self.kv_caches, self.dtype, shapes, what="the draft model", greedy=False
        )

    def release(self) -> None:
        """Free the draft model's graphs, KV cache and weights (EngineCore.shutdown)."""
        from worker.release import release_model

        if self.graph_runner is not None:
            self.graph_runner.release()
            self.graph_runner = None
        self.kv_caches.clear()
        self.seqs.clear()
        self.draft_probs.clear()
        release_model(self.model)

    def retain(self, request_ids: set[str]) -> None:
        """Free the draft state of every request not in `request_ids`."""
        for rid in [r for r in self.seqs if r not in request_ids]:
            self._drop(rid)

    def _drop(self, rid: str) -> None:
        self.kv.free(rid)
        del self.seqs[rid]
        self.draft_probs.pop(rid, None)

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        proposals: list[list[int]] = [[] for _ in requests]
        active: list[int] = []  # indices into requests that get proposals
        feeds: list[list[int]] = []
        for i, (req, k) in enumerate(zip(requests, num_tokens, strict=True)):
            self.draft_probs.pop(req.request_id, None)
            if k < 1:
                continue
            seq = self.seqs.setdefault(req.request_id, _DraftSeq(req.request_id))
            keep = _common_prefix(seq.tokens, req.all_token_ids)
            # The last token is always fed: its logits give the first proposal.
            keep = min(keep, req.num_tokens - 1)
            del seq.tokens[keep:]
            feed = req.all_token_ids[keep:]
            # Slots for the catch-up tokens and the k - 1 proposals fed after them.
            if not self.kv.allocate_slots(cast(Request, seq), len(feed) + k - 1):
                self._drop(req.request_id)  # out of draft blocks: no proposals this step
                continue
            active.append(i)
            feeds.append(feed)
        qs: list[list[torch.Tensor]] = [[] for _ in requests]
        for j in range(max((num_tokens[i] for i in active), default=0)):
            if j > 0:  # feed each request's previous proposal
                active = [i for i in active if num_tokens[i] > j]
                feeds = [proposals[i][-1:] for i in active]
            logits = self._forward([requests[i].request_id for i in active], feeds)
            tokens, q = self._draw(
                logits, [requests[i] for i in active], [proposals[i] for i in active]
            )
            for b, i in enumerate(active):
                proposals[i].append(tokens[b])
                qs[i].append(q[b])
        for i, req in enumerate(requests):
            if proposals[i]:
                self.draft_probs[req.request_id] = torch.stack(qs[i])
        return proposals

    def _forward(self, rids: list[str], feeds: list[list[int]]) -> torch.Tensor:
        """Append `feeds[b]` to request b's draft KV; logits at each request's last token."""
        batch = HostBatch(self.kv.block_size)
        for rid, feed in zip(rids, feeds, strict=True):
            seq = self.seqs[rid]
            batch.add(feed, len(seq.tokens), self.kv.block_table(rid))
            seq.tokens.extend(feed)
        host = batch.finish()
        if self.graph_runner is not None and self.graph_runner.can_run(host):
            hidden = self.graph_runner.run(host)
        else:
            inputs = to_device(host, self.device)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.md)
        return self.model.compute_logits(
            take_rows(hidden, [q - 1 for q in batch.qsl[1:]])
        )  # [B, V]

    def _draw(
        self, logits: torch.Tensor, requests: list[Request], proposed: list[list[int]]
    ) -> tuple[list[int], torch.Tensor]:
        """One proposal per row from the draft's processed distribution q (argmax if greedy)."""
        batch = SamplingBatch(
            params=[r.params for r in requests],
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[
                r.output_token_ids + p for r, p in zip(requests, proposed, strict=True)
            ],
            steps=[r.num_output_tokens + len(p) for r, p in zip(requests, proposed, strict=True)],
        )
        if all(p.temperature < GREEDY_EPS for p in batch.params):
            tokens = self.sampler.greedy_tokens(logits, batch)
            q = torch.zeros_like(logits[:, : self.config.vocab_size], dtype=torch.float32)
            return tokens.tolist(), q.scatter_(1, tokens.unsqueeze(1), 1.0)
        q = self.sampler.processed_probs(logits, batch)  # [B, V]; greedy rows one-hot
        noise = self.sampler.exponential_noise(q, batch, salt=DRAFT_SALT)
        return (q / noise).argmax(dim=-1).tolist(), q


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix. Mismatches sit in the last k + 1 tokens, so the head is
    compared in one C-level slice comparison and only the tail is walked."""
    n = min(len(a), len(b))
    i = max(0, n - 64)
    if a[:i] != b[:i]:
        i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
