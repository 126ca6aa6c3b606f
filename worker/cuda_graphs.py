"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with new inputs.

A decode step of B requests runs the graph of the smallest bucket >= B. Inputs live in
static buffers sized for the largest bucket; the unused rows are padding:

    input_ids / positions   [B real | pad 0 ...]
    slot_mapping            [B real | -1 ...]        (-1: the KV write skips the row)
    query_start_loc         [0 1 .. B | B B ...]     (padding requests have q_len 0)
    seq_lens                [B real | 0 ...]         (kernels exit early on 0)
    block_tables            [B rows | 0 ...]

The graphs are captured largest first into one shared memory pool, and with the seq_len
bound fixed at max_model_len, so replaying at longer contexts than at capture stays right.
"""

from __future__ import annotations

import logging
import time

import torch

from worker.attention import AttentionMetadata
from worker.input_batch import HostInputs
from worker.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8, *list(range(16, 257, 16)), *list(range(288, 513, 32))]
    top = min(max_num_seqs, 512)
    out = [s for s in sizes if s < top] + [top]
    return sorted(set(out))


class CudaGraphRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = bucket_sizes(max_num_seqs)
        self.max_bs = self.buckets[-1]
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        n = self.max_bs
        i32, i64 = torch.int32, torch.int64
        # Device buffers the graphs read, and pinned host twins they are refilled from.
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=i64, device=device)
        self.query_start_loc = torch.zeros(n + 1, dtype=i32, device=device)
        self.seq_lens = torch.zeros(n, dtype=i32, device=device)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=i32, device=device)
        self.host_i64 = torch.zeros((3, n), dtype=i64, pin_memory=True)
        self.host_i32 = torch.zeros(2 * n + 1, dtype=i32, pin_memory=True)
        self.host_bt = torch.zeros((n, self.max_blocks), dtype=i32, pin_memory=True)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _md(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        # Capture-time inputs: every request one token long in block 0, writes skipped.
        self.query_start_loc.copy_(torch.arange(self.max_bs + 1, dtype=torch.int32))
        self.seq_lens.fill_(1)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.buckets):  # largest first: later ones reuse its pool
                md = self._md(bs)
                args = (self.input_ids[:bs], self.positions[:bs], self.kv_caches, md)
                for _ in range(2):  # warm up: compile kernels, size workspaces, autotune
                    self.model(*args)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[bs] = self.model(*args)
                self.graphs[bs] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured %d CUDA graphs in %.1fs", len(self.graphs), time.perf_counter() - t0)

    def can_run(self, host: HostInputs) -> bool:
        return (
            host.is_decode_only
            and len(host.seq_lens) <= self.max_bs
            and host.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, host: HostInputs) -> torch.Tensor:
        """Replay the bucket's graph on this step's inputs; returns hidden states [B, H]."""
        b = len(host.seq_lens)
        bs = next(s for s in self.buckets if s >= b)
        h64, h32, hbt = self.host_i64, self.host_i32, self.host_bt
        h64[0, :b] = torch.from_numpy(host.input_ids)
        h64[1, :b] = torch.from_numpy(host.positions)
        h64[2, :b] = torch.from_numpy(host.slot_mapping)
        h64[2, b:bs] = -1
        h32[: b + 1] = torch.from_numpy(host.query_start_loc)
        h32[b + 1 : bs + 1] = b
        seq = h32[self.max_bs + 1 :]
        seq[:b] = torch.from_numpy(host.seq_lens)
        seq[b:bs] = 0
        width = host.block_tables.shape[1]
        hbt[:b, :width] = torch.from_numpy(host.block_tables)
        self.input_ids[:bs].copy_(h64[0, :bs], non_blocking=True)
        self.positions[:bs].copy_(h64[1, :bs], non_blocking=True)
        self.slot_mapping[:bs].copy_(h64[2, :bs], non_blocking=True)
        self.query_start_loc[: bs + 1].copy_(h32[: bs + 1], non_blocking=True)
        self.seq_lens[:bs].copy_(seq[:bs], non_blocking=True)
        self.block_tables[:b, :width].copy_(hbt[:b, :width], non_blocking=True)
        self.graphs[bs].replay()
        return self.outputs[bs][:b]
