"""Which worker gets a request: the least loaded; with `--routing prefix`, the one most
likely to hold the request's prompt prefix in its KV cache; with `--routing session`, the
one its session key hashes to.

Prefix routing keys a prompt by chained hashes of its full blocks, the same shape as the
worker's prefix cache keys: key_i = hash(key_{i-1}, tokens of block i). The router remembers
which worker each key last went to (LRU, bounded). A new request goes to the worker holding
its longest remembered prefix, unless that worker is much busier than the least loaded one,
so one hot prefix cannot pile every request onto one worker.

Session routing is rendezvous (highest-random-weight) hashing: a session goes to the live
worker w with the largest hash(session, w's worker id). Every gateway computes the same
answer from the same live workers without talking to the others; when a worker leaves, only
its sessions move, each to the worker with its next largest hash (so they spread over the
rest); when it comes back (same worker id), they return. Requests without a key go to the
least loaded worker.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from gateway.errors import ServiceUnavailable
from gateway.workers import WorkerConnection
from ipc.block_hash import block_hashes

ROUTING_POLICIES = ("least-loaded", "prefix", "session")


def rendezvous_score(session: str, worker_id: str) -> int:
    """A hash both gateways compute alike (Python's hash() is salted per process)."""
    data = f"{session}\x00{worker_id}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def rendezvous_choice(session: str, workers: Sequence[WorkerConnection]) -> WorkerConnection:
    return max(workers, key=lambda w: (rendezvous_score(session, w.worker_id or ""), w.address))


class Router:
    def __init__(
        self,
        policy: str = "least-loaded",
        *,
        block_size: int = 16,
        max_prefix_blocks: int = 64,
        max_entries: int = 200_000,
        imbalance: int = 8,
    ) -> None:
        if policy not in ROUTING_POLICIES:
            raise ValueError(
                f"routing must be one of {', '.join(ROUTING_POLICIES)}, got {policy!r}"
            )
        self.policy = policy
        self.block_size = block_size  # tokens per prefix key (the workers' KV block size)
        self.max_prefix_blocks = max_prefix_blocks  # only the first blocks decide
        self.max_entries = max_entries  # remembered prefix keys, least recently used dropped
        self.imbalance = imbalance  # extra load tolerated on the prefix holder
        self._owner: OrderedDict[int, str] = OrderedDict()  # prefix key -> worker address

    def choose(
        self,
        workers: Sequence[WorkerConnection],
        model: str,
        prompt: Sequence[int],
        session: str | None = None,
    ) -> WorkerConnection:
        candidates = [
            w for w in workers if w.routable and w.info is not None and w.info.model_name == model
        ]
        if not candidates:
            raise ServiceUnavailable(f"no worker serving model {model!r} is available")
        # A draining worker (SIGTERM) refuses new requests: the others take them (its
        # sessions too, each to the worker rendezvous hashing picks among the rest).
        candidates = [w for w in candidates if not w.stats.draining] or candidates
        if self.policy == "session" and session:
            return rendezvous_choice(session, candidates)
        # Fewest requests ahead; then the emptier KV cache (fewer preemptions to come).
        least = min(candidates, key=lambda w: (w.load, w.stats.kv_cache_usage))
        if self.policy != "prefix" or len(candidates) == 1:
            return least
        keys = self._prefix_keys(prompt)
        chosen = least
        by_address = {w.address: w for w in candidates}
        for key in reversed(keys):
            holder = by_address.get(self._owner.get(key, ""))
            if holder is not None:
                if holder.load <= least.load + self.imbalance:
                    chosen = holder
                break
        for key in keys:
            self._owner[key] = chosen.address
            self._owner.move_to_end(key)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)
        return chosen

    def _prefix_keys(self, prompt: Sequence[int]) -> list[int]:
        # The workers' own prefix-cache keys (ipc/block_hash.py: pure Python, no torch).
        return block_hashes(prompt, self.block_size, limit=self.max_prefix_blocks)
