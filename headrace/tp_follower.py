"""`python -m headrace.tp_follower`: one follower rank of a tensor-parallel group.

Started by the leader (headrace/tp_group.py), never by hand: it joins the leader's group,
builds its shard of the engine, then runs the steps the leader publishes until the leader
closes the ring (exit 0) or dies (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

import msgspec

from worker.config import EngineConfig

log = logging.getLogger("headrace.tp_follower")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m headrace.tp_follower", description=__doc__)
    p.add_argument("--rank", type=int, required=True, help="this follower's rank (1 .. N-1)")
    p.add_argument("--store-port", type=int, required=True, help="the leader's TCPStore port")
    p.add_argument("--ring", required=True, help="the leader's shared-memory ring (a path)")
    p.add_argument("--leader-pid", type=int, required=True, help="exit when it is gone")
    p.add_argument("--config-json", required=True, help="the EngineConfig as JSON")
    p.add_argument("--log-level", default="WARNING")
    return p


def _watch_leader(pid: int) -> None:
    """Exit when the leader is gone, even from inside a collective that will never end."""
    while True:
        time.sleep(0.5)
        if os.getppid() != pid:
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s rank{args.rank} %(name)s: %(message)s",
    )
    threading.Thread(target=_watch_leader, args=(args.leader_pid,), daemon=True).start()
    config = msgspec.json.decode(args.config_json.encode(), type=EngineConfig)

    from ipc.shm_ring import PeerDied, ShmRingReader
    from worker.model_loader import resolve_device
    from worker.parallel.engine import TpFollowerEngine
    from worker.parallel.follower import run_follower
    from worker.parallel.state import TpGroup, connect_store, join_group, rank_device

    size = config.tensor_parallel_size
    ring = ShmRingReader(args.ring, args.rank - 1)  # first: the leader sees our pid
    group = TpGroup(args.rank, size, rank_device(resolve_device(config.device).type, args.rank))
    join_group(group, connect_store(args.store_port, size))
    engine = TpFollowerEngine(config, group)
    try:
        steps = run_follower(engine, ring)
    except Exception as e:  # PeerDied, or a collective failing with its peers
        log.error("rank %d stops: %s: %s", args.rank, type(e).__name__, e)
        if isinstance(e, PeerDied):  # the leader could not remove its ring: do it here
            for f in ring.path.parent.glob(ring.path.name + "*"):
                f.unlink(missing_ok=True)
        return 1
    log.info("leader closed the ring after %d steps", steps)
    ring.close()
    group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
