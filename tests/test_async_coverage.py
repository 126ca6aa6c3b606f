"""The randomized async == sync workloads really exercise what they claim: over the seeds
tests/test_async_overlap.py runs there are preemptions, aborts at a step, penalized,
seeded and greedy requests and deferred sampling. Their aborts at a token (a random id)
never fire, so the second test packs everything into one workload: every other request
penalized and seeded, a KV cache small enough to preempt, an abort at a step and one at
a token the request does produce, with the synchronous engine's tokens."""

from __future__ import annotations

import msgspec

from tests.test_async_overlap import Workload, assert_same, draw_workload, drive


def test_random_workloads_cover_every_feature(stories_path) -> None:
    seen = dict(preempted=0, abort_step=0, penalized=0, seeded=0, greedy=0)
    deferred = 0
    for seed in range(10):
        w = draw_workload(seed)
        run = drive(str(stories_path), w, True)
        seen["preempted"] += run.engine.scheduler.num_preemptions
        seen["abort_step"] += sum(run.finish.get(r) == "abort" for r in w.abort_at_step.values())
        for _, _, p, _ in w.requests:
            seen["penalized"] += p.frequency_penalty != 0 or p.repetition_penalty != 1
            seen["seeded"] += p.seed is not None
            seen["greedy"] += p.temperature == 0
        assert run.engine.stepper is not None
        deferred += run.engine.stepper.num_deferred
    assert all(n > 0 for n in seen.values()), seen
    assert deferred > 0


def test_one_workload_with_everything_at_once(stories_path) -> None:
    for seed in (3, 11):
        w = draw_workload(seed)
        reqs = []
        for i, (rid, prompt, p, at) in enumerate(w.requests):
            if i % 2 == 0:  # penalized and seeded (random rows), the others as drawn
                p = msgspec.structs.replace(
                    p, temperature=0.8, seed=1000 + i, frequency_penalty=0.5,
                    presence_penalty=0.3, repetition_penalty=1.2, max_tokens=24,
                )  # fmt: skip
            reqs.append((rid, prompt, p, at))
        args = dict(w.engine_args, num_gpu_blocks=18, max_num_seqs=8)
        w = Workload(reqs, {4: reqs[1][0]}, {}, args)
        probe = drive(str(stories_path), w, False)
        # Abort request 0 at its third token, as a gateway's stop string would.
        w.abort_at_token[reqs[0][0]] = probe.tokens[reqs[0][0]][2]
        sync, asyn = drive(str(stories_path), w, False), drive(str(stories_path), w, True)
        assert asyn.engine.scheduler.num_preemptions > 0, seed
        assert asyn.finish[reqs[0][0]] == sync.finish[reqs[0][0]] == "abort", seed
        assert_same(sync, asyn, seed, cut=tuple(w.abort_at_step.values()))
