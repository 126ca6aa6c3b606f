"""A follower rank of a tensor-parallel group: run whatever forward the leader publishes.

A follower builds the same engine as the leader up to its KV cache and CUDA graphs
(worker/parallel/engine.py TpFollowerEngine: no scheduler work, no sampler, no requests),
then loops over the ring:

    TpStep    run the forward on this rank's shard (eager, or the same graph as the leader)
    TpLogits  take the broadcast hidden rows, compute this rank's logits, join the gather
    closed    the leader shut down: exit

Reading spins, then sleeps (ipc/shm_ring.py), so an idle follower costs little CPU while a
busy one picks each step up within microseconds.
"""

from __future__ import annotations

import logging

import msgspec
import numpy as np
import torch

from ipc.messages import TpMessage, TpStep
from ipc.shm_ring import RingClosed, ShmRingReader
from worker.input_batch import HostInputs
from worker.parallel.engine import TpFollowerEngine

log = logging.getLogger(__name__)


def host_inputs(msg: TpStep) -> HostInputs:
    def arr(b: bytes, dtype: type) -> np.ndarray:
        return np.frombuffer(b, dtype=dtype).copy()  # writable: torch.from_numpy needs it

    tables = arr(msg.block_tables, np.int32).reshape(-1, msg.block_table_width)
    return HostInputs(
        input_ids=arr(msg.input_ids, np.int64),
        positions=arr(msg.positions, np.int64),
        slot_mapping=arr(msg.slot_mapping, np.int64),
        query_start_loc=arr(msg.query_start_loc, np.int32),
        seq_lens=arr(msg.seq_lens, np.int32),
        block_tables=tables,
        max_query_len=msg.max_query_len,
        max_seq_len=msg.max_seq_len,
        sample_rows=[],  # the leader samples
        sample_sched_index=[],
    )


@torch.inference_mode()
def run_follower(engine: TpFollowerEngine, ring: ShmRingReader) -> int:
    """Serve the leader's steps until it closes the ring; returns the steps run.
    Raises PeerDied if the leader dies."""
    group, runner = engine.tp, engine.runner
    decoder = msgspec.msgpack.Decoder(TpMessage)
    hidden_size, steps = engine.model_config.hidden_size, 0
    while True:
        try:
            msg = decoder.decode(ring.recv())
        except RingClosed:
            return steps
        if isinstance(msg, TpStep):
            host = host_inputs(msg)
            ids = None
            if msg.ids_from_leader:
                ids = torch.empty(host.num_tokens, dtype=torch.int64, device=engine.device)
                group.broadcast(ids)
            runner.run_forward(host, msg.use_graph, ids)
            steps += 1
        else:
            rows = torch.empty(
                (msg.num_rows, hidden_size), dtype=engine.dtype, device=engine.device
            )
            runner.model.compute_logits(rows)  # the broadcast fills rows
