"""EngineCore as one rank of a tensor-parallel group.

The leader (rank 0, TpEngineCore) is a whole engine whose model, KV cache and device are
its rank's; its forwards and logits calls reach the followers through
worker/parallel/leader.py. A follower (TpFollowerEngine) makes the same start-up up to
its KV cache and CUDA graphs, then runs worker/parallel/follower.py's loop. Every rank's
start-up meets the others in the same collectives, in the same order: the memory
profile's forward, the KV block count's minimum, the graph captures.
"""

from __future__ import annotations

from worker.config import EngineConfig
from worker.engine import EngineCore
from worker.model_runner import ModelRunner
from worker.parallel.plan import ShardPlan, check_checkpoint_splits
from worker.parallel.state import TpGroup
from worker.request import OwnedOutput


class TpEngineCore(EngineCore):
    tp: TpGroup

    def __init__(self, config: EngineConfig, group: TpGroup) -> None:
        self.tp = group
        super().__init__(config)

    def _open_checkpoint(self) -> None:
        super()._open_checkpoint()
        check_checkpoint_splits(
            self.files.config, self.config.quantization, self.tp.size, self.files.path
        )
        plan = ShardPlan.make(self.model_config, self.tp.rank, self.tp.size)
        self.rank_config = plan.rank_config(self.model_config)
        if self.device.type == "cuda":
            self.device = self.tp.device  # cuda:rank

    def _load_model(self) -> ModelRunner:
        runner = super()._load_model()  # build_model shards it for self.tp
        runner.config = self.rank_config  # the KV cache holds this rank's heads only
        return runner

    def _num_kv_blocks(self, max_batched_tokens: int) -> int:
        # Every rank holds the same blocks: the count that fits on the fullest GPU.
        return self.tp.min_int(super()._num_kv_blocks(max_batched_tokens))

    def has_unfinished_requests(self) -> bool:
        # A broken group has work: the step raises, and the worker exits.
        return super().has_unfinished_requests() or self.tp.failure is not None

    def step_with_owners(self) -> list[OwnedOutput]:
        # Any failure may leave the followers mid-collective, out of step with us: the
        # group cannot go on (FatalEngineError; the worker's supervisor restarts it).
        self.tp.check()
        try:
            return super().step_with_owners()
        except Exception as e:
            self.tp.check(e)
            raise


class TpFollowerEngine(TpEngineCore):
    """A follower rank: EngineCore.__init__'s device side only (no scheduler work, no
    sampler, no requests: the leader's steps arrive through the ring)."""

    def __init__(self, config: EngineConfig, group: TpGroup) -> None:
        config.validate()
        self.config = config
        self.tp = group
        # As EngineCore.__init__ up to the KV cache (tests/test_tensor_parallel.py runs
        # followers against a leader, which hangs if the two ever differ).
        self._open_checkpoint()
        self.config = config = self._with_batch_limits(config)  # as the leader's
        self.runner = self._load_model()
        max_batched = self.max_num_batched_tokens
        self._allocate_kv_cache(self._num_kv_blocks(max_batched), max_batched)
