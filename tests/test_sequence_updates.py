"""gateway.serving_common.sequence_updates: the loop every completion and chat call runs."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import APIError, InternalError, ServiceUnavailable
from gateway.sequence import SequenceState
from gateway.serving_common import sequence_updates
from gateway.tokenizer import load_tokenizer
from ipc.messages import FinishReason, RequestOutput, SamplingParams
from tests.serving_fakes import ScriptedSubmission


def collect(sub: ScriptedSubmission, seqs: list[SequenceState]) -> list[list[tuple[int, str]]]:
    async def run() -> list[list[tuple[int, str]]]:
        return [
            [(i, d.text) for i, d in updates]
            async for updates in sequence_updates(sub, seqs)  # type: ignore[arg-type]
        ]

    return asyncio.run(run())


@pytest.fixture()
def tok(stories_path):
    return load_tokenizer(str(stories_path))


def test_stop_string_aborts_and_later_outputs_are_dropped(tok):
    ids = tok.encode(" upon a time there", add_special_tokens=False)
    seqs = [
        SequenceState(tok, [1], SamplingParams(max_tokens=50, stop=["time"])),
        SequenceState(tok, [1], SamplingParams(max_tokens=50)),
    ]
    sub = ScriptedSubmission(
        [
            [(0, RequestOutput("a", ids[:2])), (1, RequestOutput("b", ids[:1]))],
            [(0, RequestOutput("a", ids[2:])), (1, RequestOutput("b", ids[1:2]))],
            # The worker had not seen the abort yet: more tokens for the stopped sequence.
            [
                (0, RequestOutput("a", ids[:1])),
                (1, RequestOutput("b", [], finish_reason=FinishReason.LENGTH)),
            ],
        ]
    )
    got = collect(sub, seqs)
    assert sub.aborted == [0]
    assert seqs[0].text == " upon a " and seqs[0].finish_reason == "stop"
    assert [i for i, _ in got[2]] == [1]  # nothing for sequence 0 after its stop
    assert seqs[1].finish_reason == "length" and not sub.closed


@pytest.mark.parametrize("lost,error", [(False, InternalError), (True, ServiceUnavailable)])
def test_an_error_raises_after_the_batch_updates_before_it(tok, lost, error):
    seqs = [SequenceState(tok, [1], SamplingParams(max_tokens=50)) for _ in range(2)]
    ids = tok.encode(" once", add_special_tokens=False)
    # A lost worker's failure carries a 503 (gateway/inflight.py fail_worker).
    status = 503 if lost else 0
    failed = RequestOutput(
        "b", [], finish_reason=FinishReason.ERROR, error="boom", error_status=status
    )
    sub = ScriptedSubmission(
        [
            [(0, RequestOutput("a", ids)), (1, RequestOutput("b", ids))],
            [(0, RequestOutput("a", ids)), (1, failed)],
        ]
    )
    seen: list[list[int]] = []

    async def run() -> None:
        async for updates in sequence_updates(sub, seqs):  # type: ignore[arg-type]
            seen.append([i for i, _ in updates])

    with pytest.raises(APIError) as e:
        asyncio.run(run())
    assert type(e.value) is error and e.value.message == "boom"
    assert seen == [[0, 1], [0]]  # sequence 0's update in the failing batch came first
    assert sub.closed  # the siblings are aborted with the submission
