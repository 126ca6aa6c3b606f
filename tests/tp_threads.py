"""A tensor-parallel group of threads in one process, for fast tests of the sharded math
(and of the leader/follower protocol over a real ring).

Each thread is one rank with its own engine; the collectives meet at a barrier and sum
(gather) in rank order, so every rank gets the same result, as with gloo or NCCL. Every
rank runs the whole engine on the same requests (greedy, so they sample the same tokens):
no ring is needed in process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from worker.parallel.state import TpGroup


class Exchange:
    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[Any] = [None] * size


class ThreadedGroup(TpGroup):
    def __init__(self, rank: int, size: int, exchange: Exchange) -> None:
        super().__init__(rank, size, torch.device("cpu"))
        self.exchange = exchange
        self.collectives = 0

    def _all(self, x: Any) -> list[Any]:
        ex = self.exchange
        ex.slots[self.rank] = x
        ex.barrier.wait()
        values = list(ex.slots)
        ex.barrier.wait()  # nobody overwrites a slot before every rank has read it
        self.collectives += 1
        return values

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        values = self._all(x.clone())
        total = values[0].clone()
        for v in values[1:]:
            total += v
        return x.copy_(total)

    def all_gather_cols(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._all(x.clone()), dim=1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        return x.copy_(self._all(x.clone())[0])

    def min_int(self, n: int) -> int:
        return min(self._all(n))


def run_ranks(size: int, fn: Callable[[ThreadedGroup], Any]) -> list[Any]:
    """fn(group) on `size` threads, one per rank; their results in rank order."""
    exchange = Exchange(size)
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def main(rank: int) -> None:
        try:
            results[rank] = fn(ThreadedGroup(rank, size, exchange))
        except BaseException as e:
            errors.append(e)
            exchange.barrier.abort()

    threads = [threading.Thread(target=main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
