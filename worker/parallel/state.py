"""The tensor-parallel group of one model: its ranks, their device and the collectives.

One process per rank (one GPU each; on CPU, processes on the gloo backend, which is how CI
runs it). Every rank runs the same forward on its shard and meets the others in the same
collectives, in the same order: an all-reduce after each row-parallel layer and after the
embedding, a broadcast and an all-gather for the LM head. On GPU the collectives are NCCL
(through torch.distributed), stream-ordered, so CUDA graphs capture them; NVLink
multicast (NVLS) stays off.

Only the leader (rank 0) holds requests and samples: sampling reads per-request state
(penalties over the generated tokens, seeds, grammar masks filled on the CPU) that the
followers would otherwise have to mirror. So logits are gathered on every rank (all-gather
is the collective CUDA graphs and NCCL handle best) and the followers drop theirs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from worker.errors import FatalEngineError

log = logging.getLogger(__name__)

# A collective waits this long for a slow rank before failing (a dead one is noticed far
# sooner: gloo fails at once, the leader's watchdog aborts NCCL).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
STORE_TIMEOUT = timedelta(seconds=120)  # every rank joins within this of the leader
EXPLAIN_WAIT_S = 1.0  # see TpGroup.check


# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name); GPU images may
# carry an older torch.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TpGroup:
    """This process's rank in a group of `size`, on `device`."""

    def __init__(self, rank: int, size: int, device: torch.device) -> None:
        self.rank = rank
        self.size = size
        self.device = device
        # Why the group can no longer run (a follower died, a collective failed); set by
        # the leader's watchdog thread, read by the engine.
        self.failure: str | None = None
        # The leader's hook: tell the followers a logits call of n rows follows (set once
        # the group serves; during start-up every rank makes the same calls by itself).
        self.on_logits: Callable[[int], None] | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        dist.all_reduce(x)
        return x

    def all_gather_cols(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] on every rank -> [N, size * C], rank r's columns at [r*C, (r+1)*C)."""
        out = torch.empty((self.size * x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
        _all_gather(out, x.contiguous())
        return out.view(self.size, x.shape[0], x.shape[1]).permute(1, 0, 2).reshape(x.shape[0], -1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """The leader's x on every rank (in place; x must be contiguous)."""
        dist.broadcast(x, src=0)
        return x

    def min_int(self, n: int) -> int:
        """The smallest of every rank's n (e.g. KV blocks that fit on each rank)."""
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def check(self, cause: BaseException | None = None) -> None:
        """Raise FatalEngineError if the group is broken (or `cause` broke it)."""
        if self.failure is None and cause is not None:
            # A collective failing on a dead peer (gloo) beats the leader's watchdog to it:
            # give the watchdog a moment to say which rank died.
            deadline = time.monotonic() + EXPLAIN_WAIT_S
            while self.failure is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if self.failure is None:
                what = str(cause).splitlines()[0][:300] if str(cause) else ""
                self.failure = f"tensor-parallel step failed: {type(cause).__name__}: {what}"
        if self.failure is not None:
            raise FatalEngineError(self.failure) from cause

    def abort(self) -> None:
        """Unblock collectives waiting on a dead rank (NCCL waits forever otherwise)."""
        if not dist.is_initialized():
            return
        backend = dist.get_backend()
        if backend == "nccl":
            try:
                dist.distributed_c10d._abort_process_group()  # type: ignore[attr-defined]
            except Exception as e:  # best effort: the process exits next anyway
                log.warning("aborting the NCCL group failed: %s", e)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_device(kind: str, rank: int) -> torch.device:
    """One GPU per rank (cuda:rank of the visible ones); every CPU rank on the CPU."""
    return torch.device("cuda", rank) if kind == "cuda" else torch.device("cpu")


def join_group(group: TpGroup, store: dist.Store) -> None:
    """Join the process group of `group.size` ranks that meet at `store`: gloo on CPU,
    NCCL on GPU (NVLink multicast off: NCCL_NVLS_ENABLE=0)."""
    if group.device.type == "cuda":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # always: see the device notes (NVLS)
        torch.cuda.set_device(group.device)
        dist.init_process_group(
            "nccl",
            store=store,
            rank=group.rank,
            world_size=group.size,
            timeout=COLLECTIVE_TIMEOUT,
            device_id=group.device,
        )
        return
    dist.init_process_group(
        "gloo", store=store, rank=group.rank, world_size=group.size, timeout=COLLECTIVE_TIMEOUT
    )


def make_store(size: int) -> dist.TCPStore:
    """The leader's rendezvous store on a free port of 127.0.0.1 (`.port` tells which)."""
    return dist.TCPStore(
        "127.0.0.1", 0, size, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT
    )


def connect_store(port: int, size: int) -> dist.TCPStore:
    """A follower's connection to the leader's store."""
    return dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=STORE_TIMEOUT)
