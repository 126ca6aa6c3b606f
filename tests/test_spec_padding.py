"""Padding steps to a CUDA graph's shape (worker/cuda_graphs.py), checked on CPU.

The graphs themselves need a GPU (tests/gpu/test_gpu_spec_graphs.py); what they read is
built here: which graph a step picks, and the padded inputs. A stand-in for the graph
runner runs the model eagerly on exactly those padded inputs inside the CPU engine, and
greedy speculative decoding must come out as without it.
"""

from __future__ import annotations

import numpy as np
import torch

from tests.test_spec_decode import ENGINE_ARGS, STORIES_TEXTS, greedy, run
from worker.attention import AttentionMetadata
from worker.cuda_graphs import bucket_sizes, pick_graph, query_bounds
from worker.input_batch import HostInputs, PaddedInputs, pad_inputs


def test_pick_graph_takes_the_smallest_family_and_bucket_that_fit():
    bounds, buckets = query_bounds(4), bucket_sizes(32)
    assert bounds == [1, 5] and query_bounds(0) == [1]
    assert pick_graph(bounds, buckets, 3, 1) == (1, 4)  # decode
    assert pick_graph(bounds, buckets, 3, 2) == (5, 4)  # a request with 1 proposal
    assert pick_graph(bounds, buckets, 9, 5) == (5, 16)  # full proposals
    assert pick_graph(bounds, buckets, 1, 6) is None  # a longer prefill chunk: eager
    assert pick_graph(bounds, buckets, 33, 1) is None  # more requests than any bucket
    assert pick_graph(query_bounds(0), buckets, 1, 2) is None  # no speculative family


def empty_buffers(max_reqs: int, max_tokens: int, max_blocks: int) -> PaddedInputs:
    # Poisoned, so anything pad_inputs should write and does not shows up.
    return PaddedInputs(
        np.full(max_tokens, 77, dtype=np.int64),
        np.full(max_tokens, 77, dtype=np.int64),
        np.full(max_tokens, 77, dtype=np.int64),
        np.full(max_reqs + 1, 77, dtype=np.int32),
        np.full(max_reqs, 77, dtype=np.int32),
        np.full((max_reqs, max_blocks), 77, dtype=np.int32),
    )


def test_pad_inputs_keeps_real_rows_and_makes_padding_inert():
    # A verifies 3 tokens at positions 8..10, B decodes position 4; graph: 4 requests x 4.
    host = HostInputs(
        input_ids=np.array([5, 6, 7, 9], dtype=np.int64),
        positions=np.array([8, 9, 10, 4], dtype=np.int64),
        slot_mapping=np.array([40, 41, 42, 20], dtype=np.int64),
        query_start_loc=np.array([0, 3, 4], dtype=np.int32),
        seq_lens=np.array([11, 5], dtype=np.int32),
        block_tables=np.array([[2, 5, 10], [4, 0, 0]], dtype=np.int32),
        max_query_len=3,
        max_seq_len=11,
        sample_rows=[[0, 1, 2], [3]],
        sample_sched_index=[0, 1],
    )
    dst = empty_buffers(8, 40, 6)
    pad_inputs(host, dst, num_reqs=4, num_tokens=16)
    assert dst.input_ids[:4].tolist() == [5, 6, 7, 9]
    assert dst.positions[:4].tolist() == [8, 9, 10, 4]
    assert dst.slot_mapping[:16].tolist() == [40, 41, 42, 20] + [-1] * 12
    assert dst.query_start_loc[:5].tolist() == [0, 3, 4, 4, 4]
    assert dst.seq_lens[:4].tolist() == [11, 5, 0, 0]
    assert dst.block_tables[:2, :3].tolist() == [[2, 5, 10], [4, 0, 0]]
    assert (dst.slot_mapping[16:] == 77).all()  # beyond the graph: untouched


class PaddedEagerRunner:
    """What CudaGraphRunner replays, run eagerly: the model on the padded static inputs."""

    def __init__(self, model, max_num_seqs: int, max_model_len: int, block_size: int, k: int):
        self.model = model
        self.buckets = bucket_sizes(max_num_seqs)
        self.bounds = query_bounds(k)
        self.max_model_len = max_model_len
        max_bs, max_blocks = self.buckets[-1], -(-max_model_len // block_size)
        self.buffers = empty_buffers(max_bs, max_bs * self.bounds[-1], max_blocks)
        self.buffers.block_tables[:] = 0
        self.replays = dict.fromkeys(self.bounds, 0)

    def can_run(self, host: HostInputs) -> bool:
        return (
            pick_graph(self.bounds, self.buckets, len(host.seq_lens), host.max_query_len)
            is not None
        )

    def run(self, host: HostInputs) -> torch.Tensor:
        key = pick_graph(self.bounds, self.buckets, len(host.seq_lens), host.max_query_len)
        assert key is not None
        q, bs = key
        n, b = bs * q, self.buffers
        # Padding rows hold arbitrary (stale) ids and positions in the graphs: poison them.
        b.input_ids[host.num_tokens : n] = 3
        b.positions[host.num_tokens : n] = 1
        pad_inputs(host, b, bs, n)
        md = AttentionMetadata(
            query_start_loc=torch.from_numpy(b.query_start_loc[: bs + 1].copy()),
            seq_lens=torch.from_numpy(b.seq_lens[:bs].copy()),
            block_tables=torch.from_numpy(b.block_tables[:bs].copy()),
            slot_mapping=torch.from_numpy(b.slot_mapping[:n].copy()),
            max_query_len=q,
            max_seq_len=self.max_model_len,
        )
        ids = torch.from_numpy(b.input_ids[:n].copy())
        pos = torch.from_numpy(b.positions[:n].copy())
        self.replays[q] += 1
        return self.model(ids, pos, self.kv_caches, md)[: host.num_tokens]


def test_greedy_speculation_through_padded_graph_inputs(stories_path):
    from gateway.tokenizer import load_tokenizer
    from headrace.llm import LLM

    tok = load_tokenizer(str(stories_path))
    stories_prompts = [tok.encode(t) for t in STORIES_TEXTS]

    params = greedy(logprobs=2)
    spec = dict(speculative_method="ngram", num_speculative_tokens=3)
    base, base_lps, _, _ = run(stories_path, stories_prompts, params, **spec)

    llm = LLM(str(stories_path), **{**ENGINE_ARGS, **spec})
    engine = llm.engine
    runner = PaddedEagerRunner(
        engine.runner.model, ENGINE_ARGS["max_num_seqs"], engine.max_model_len, 4, 3
    )
    runner.kv_caches = engine.runner.kv_caches
    engine.runner.graph_runner = runner  # type: ignore[assignment]
    outs = [r.outputs[0] for r in llm.generate(stories_prompts, params)]
    assert [o.token_ids for o in outs] == base
    for seq, seq_base in zip([o.logprobs for o in outs], base_lps, strict=True):
        for lp, lp_base in zip(seq, seq_base, strict=True):
            assert lp.token_ids[0] == lp_base.token_ids[0]
            assert abs(lp.logprobs[0] - lp_base.logprobs[0]) < 1e-4
    assert runner.replays[1] > 0 and runner.replays[4] > 0
    assert engine.stats().spec_proposed > 0
    engine.kv.check_invariants()
