"""The overlapped mask path (worker/grammar_masks.py): masks prepared on the mask thread
equal the synchronous fill's through joins, finishes, aborts, preemption, speculative rows
and reordering; and no engine thread touches a matcher while a mask job is in flight."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from ipc.messages import EngineRequest, GrammarKind, GuidedDecoding, SamplingParams
from worker.grammar_masks import StepMasks
from worker.structured import GrammarBackend, RequestGrammar, grammar_bitmask

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
    },
    "required": ["name", "n"],
    "additionalProperties": False,
}
JSON = GuidedDecoding(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
REGEX = GuidedDecoding(GrammarKind.REGEX, "(yes|no)( [0-9]{1,3})*")
VOCAB, EOS = 512, 2
CPU = torch.device("cpu")


@dataclass
class Req:
    """What StepMasks reads of a request, plus the reference matcher fed the same tokens."""

    request_id: str
    grammar: RequestGrammar | None
    ref: RequestGrammar | None
    is_finished: bool = False


def compile_grammars() -> dict[str, Any]:
    from tests.conftest import STORIES

    backend = GrammarBackend(str(STORIES), VOCAB, [EOS])
    compiled = {"json": backend.submit(JSON).result(), "regex": backend.submit(REGEX).result()}
    backend.close()
    return compiled


@pytest.fixture(scope="module")
def compiled() -> dict[str, Any]:
    return compile_grammars()


def _allowed(mask: torch.Tensor, row: int) -> list[int]:
    bits = [(int(mask[row, t // 32]) >> (t % 32)) & 1 for t in range(VOCAB)]
    return [t for t, b in enumerate(bits) if b]


def _new_request(i: int, rng: random.Random, compiled) -> Req:
    kind = rng.choice(["json", "regex", "free"])
    if kind == "free":
        return Req(f"r{i}", None, None)
    return Req(f"r{i}", RequestGrammar(compiled[kind]), RequestGrammar(compiled[kind]))


def _tokens_for(ref_mask: torch.Tensor, row: int, proposals: list[int], rng) -> list[int]:
    """Like verification: the proposals up to the first one its row forbids, then a token
    its row allows (sometimes the stop token, when allowed)."""
    out = []
    for j, p in enumerate(proposals):
        if p not in _allowed(ref_mask, row + j):
            break
        out.append(p)
    allowed = _allowed(ref_mask, row + len(out))
    pick = EOS if EOS in allowed and rng.random() < 0.3 else rng.choice(allowed)
    return [*out, pick]


@pytest.mark.parametrize("seed", range(4))
def test_prefetched_masks_equal_the_synchronous_fill(compiled, seed):
    check_random_batch(compiled, seed, CPU)


def check_random_batch(compiled, seed: int, device: torch.device) -> None:
    """40 steps of a random batch; each step's StepMasks mask equals grammar_bitmask's on
    reference matchers fed the same tokens. Also run on CUDA by tests/gpu."""
    rng = random.Random(seed)
    masks = StepMasks(VOCAB, device)
    reqs = [_new_request(i, rng, compiled) for i in range(6)]
    joined = len(reqs)
    preempted: dict[str, int] = {}  # request id -> steps left out
    for _step in range(40):
        if rng.random() < 0.2:  # a request joins
            reqs.append(_new_request(joined, rng, compiled))
            joined += 1
        if rng.random() < 0.1 and reqs:  # preemption: left out for a few steps
            preempted[rng.choice(reqs).request_id] = rng.randint(1, 3)
        if rng.random() < 0.1 and reqs:  # an abort between steps (async: still scheduled)
            rng.choice(reqs).is_finished = True
        scheduled = [r for r in reqs if preempted.get(r.request_id, 0) == 0]
        preempted = {k: v - 1 for k, v in preempted.items() if v > 1}
        if rng.random() < 0.3:
            rng.shuffle(scheduled)
        spec = rng.random() < 0.25  # a speculative step: rows after each proposal too
        props = [
            [rng.randrange(VOCAB) for _ in range(rng.randint(1, 3))]
            if spec and rng.random() < 0.5
            else []
            for _ in scheduled
        ]
        got = masks.bitmask(list(zip(scheduled, props, strict=True)))  # type: ignore[arg-type]
        got = None if got is None else got.cpu()
        ref_rows = [
            (None if r.is_finished else r.ref, p) for r, p in zip(scheduled, props, strict=True)
        ]
        want = grammar_bitmask(ref_rows, VOCAB, CPU)
        if want is None or all(g is None or not g.active for g, _ in ref_rows):
            assert got is None or bool((got == -1).all())
        else:
            assert got is not None and torch.equal(got, want)
        # The step's tokens: each scheduled request gains 1 + accepted proposals.
        updates = []
        row = 0
        for r, p in zip(scheduled, props, strict=True):
            if r.is_finished:
                row += 1 + len(p)
                continue  # its token is dropped, as update() does
            tokens = _tokens_for(want, row, p, rng) if want is not None else [rng.randrange(VOCAB)]
            row += 1 + len(p)
            if r.ref is not None:
                assert r.ref.accept(tokens)
            updates.append((r, tokens))
            if rng.random() < 0.08:
                r.is_finished = True  # finished by this step (length, stop string)
        reqs = [r for r in reqs if not r.is_finished]
        masks.prefetch(updates)  # type: ignore[arg-type]
    masks.wait()
    s = masks.stats
    assert s.rows_prefetched > 0 and s.rows_filled_now > 0, s  # both paths were exercised
    assert 0 < s.gathers < s.steps, s
    masks.close()


def test_free_finished_and_completed_rows_cost_nothing(compiled):
    masks = StepMasks(VOCAB, CPU)
    free = Req("f", None, None)
    done = Req("d", RequestGrammar(compiled["regex"]), None)  # grammar complete, EOS taken
    assert done.grammar is not None and done.grammar.matcher.accept_string("yes")
    assert done.grammar.accept([EOS]) and not done.grammar.active
    finished = Req("x", RequestGrammar(compiled["json"]), None, is_finished=True)
    masks.prefetch([(free, [5])])  # type: ignore[list-item]
    assert masks._job is None  # no constrained request: no job
    assert masks.bitmask([(free, [])]) is None  # type: ignore[list-item]
    rows = [(free, []), (done, []), (finished, [])]
    assert masks.bitmask(rows) is None  # type: ignore[arg-type]
    assert masks.stats.steps == 0
    masks.close()


class MatcherWatch:
    """Records a grammar touched by the engine's thread while a mask job is not yet joined."""

    def __init__(self, monkeypatch, masks: StepMasks) -> None:
        self.masks = masks
        self.violations: list[str] = []
        self.jobs = 0
        main = threading.current_thread()
        active = RequestGrammar.active.fget  # type: ignore[attr-defined]

        def check(what: str) -> None:
            if threading.current_thread() is main and masks._job is not None:
                self.violations.append(what)

        def watched_active(g: RequestGrammar) -> bool:
            check("active")
            return active(g)

        for name in ("accept", "fill"):
            orig = getattr(RequestGrammar, name)

            def wrapped(g, *a, _orig=orig, _name=name, **kw):
                check(_name)
                return _orig(g, *a, **kw)

            monkeypatch.setattr(RequestGrammar, name, wrapped)
        monkeypatch.setattr(RequestGrammar, "active", property(watched_active))
        run_job = masks._run_job

        def slow_job(*a, **kw):
            self.jobs += 1
            time.sleep(0.004)  # widens the window a racing access would fall into
            return run_job(*a, **kw)

        monkeypatch.setattr(masks, "_run_job", slow_job)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_aborts_and_preemption_never_race_the_mask_thread(
    stories_path, monkeypatch, async_scheduling
):
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    engine = EngineCore(
        EngineConfig(
            model=str(stories_path),
            device="cpu",
            max_num_seqs=6,
            num_gpu_blocks=10,  # too few for all: requests get preempted
            block_size=16,
            async_scheduling=async_scheduling,
        )
    )
    for spec in (JSON, REGEX):  # compiled up front: every request joins at the first step
        engine.grammars.backend.submit(spec).result()
    watch = MatcherWatch(monkeypatch, engine.runner.masks)
    switch_interval = sys.getswitchinterval()
    prompts = [[1, 403, 407, 261, 378], [1, 317], [1, 403, 407], [1, 500, 17], [1, 9], [1, 44]]
    for i, prompt in enumerate(prompts):
        guided = [JSON, REGEX, None][i % 3]
        params = SamplingParams(
            temperature=0.7, seed=i, max_tokens=40, guided=guided, ignore_eos=guided is not JSON
        )
        assert engine.add_request(EngineRequest(f"r{i}", prompt, params)) is None
    text: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    finish: dict[str, str] = {}
    steps = 0
    while engine.has_unfinished_requests() and steps < 500:
        for o in engine.step():
            text[o.request_id] += o.new_token_ids
            if o.finish_reason is not None:
                finish[o.request_id] = str(o.finish_reason)
        steps += 1
        if steps in (5, 9):  # aborts while the next step's masks are being filled
            engine.abort_requests([f"r{steps % 6}", "r3"])
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_preemptions > 0, "the test meant to force preemption"
    assert watch.jobs > 5 and engine.runner.masks.stats.rows_prefetched > 0
    assert watch.violations == []
    engine.runner.masks.wait()  # the interpreter's switch interval is back once joined
    assert sys.getswitchinterval() == switch_interval
    import jsonschema

    tok = _stories_tokenizer(stories_path)
    for rid, reason in finish.items():
        i = int(rid[1:])
        if reason == "stop" and i % 3 == 0:
            jsonschema.validate(json.loads(tok.decode(text[rid])), SCHEMA)


def _stories_tokenizer(path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))
