"""gateway/inflight.py: the one table of the gateway's requests in flight (routes, their
submissions, started or waiting) and the paths through it: add, outputs, finish, abort,
a worker lost or restarted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.inflight import Child, InFlight, Submission
from gateway.workers import ConnectionConfig, WorkerConnection, WorkerState
from ipc.messages import AbortRequests, FinishReason, ModelInfo, RequestOutput, SamplingParams


class FakeWorker:
    """A connection's send(), recording what the table sends."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sent: list[Any] = []

    def send(self, msg: Any) -> bool:
        self.sent.append(msg)
        return True


def submit(table: InFlight, ids: list[str], workers: list[Any]) -> Submission:
    children = [Child(rid, [1, 2], SamplingParams(max_tokens=4)) for rid in ids]
    sub = Submission(table, children)
    for index, (child, worker) in enumerate(zip(children, workers, strict=True)):
        table.add(child, sub, index, worker)
    return sub


def drain(sub: Submission) -> list[tuple[int, RequestOutput]]:
    """Everything the submission hands over until it ends (it must end)."""

    async def run() -> list[tuple[int, RequestOutput]]:
        got: list[tuple[int, RequestOutput]] = []
        async for items in sub:
            got += items
        return got

    return asyncio.run(asyncio.wait_for(run(), 5))


def test_outputs_start_a_route_and_the_final_one_ends_it() -> None:
    table, w0, w1 = InFlight(), FakeWorker("w0"), FakeWorker("w1")
    sub = submit(table, ["a", "b"], [w0, w1])
    assert (len(table), table.num_waiting, table.count(w0), table.count(w1)) == (2, 2, 1, 1)
    assert table.request_ids(w0) == ["a"] and table.request_ids(w1) == ["b"]
    table.deliver([RequestOutput("a", [5])])
    assert table.num_waiting == 1 and "a" in table and table.count(w0) == 1
    table.deliver([RequestOutput("a", [6], finish_reason=FinishReason.STOP)])
    assert "a" not in table and table.count(w0) == 0 and table.num_waiting == 1
    table.deliver([RequestOutput("b", [7], finish_reason=FinishReason.LENGTH)])
    assert len(table) == 0 and table.num_waiting == 0
    table.check()
    got = drain(sub)
    assert [(i, o.new_token_ids) for i, o in got] == [(0, [5]), (0, [6]), (1, [7])]
    assert w0.sent == w1.sent == []  # nothing to abort: all finished
    sub.close()  # after the end: nothing in flight, nothing sent
    assert w0.sent == w1.sent == []


def test_abort_tells_each_worker_once_and_drops_later_outputs() -> None:
    table, w0, w1 = InFlight(), FakeWorker("w0"), FakeWorker("w1")
    sub = submit(table, ["a", "b", "c"], [w0, w0, w1])
    table.deliver([RequestOutput("a", [5])])
    sub.abort(0)  # a stop string matched in child 0
    assert [m.request_ids for m in w0.sent] == [["a"]]
    assert "a" not in table and table.num_waiting == 2
    table.deliver([RequestOutput("a", [6])])  # computed before the abort arrived: dropped
    sub.close()  # the client left: the rest, one message per worker
    assert [m.request_ids for m in w0.sent] == [["a"], ["b"]]
    assert [m.request_ids for m in w1.sent] == [["c"]]
    assert all(isinstance(m, AbortRequests) for m in w0.sent + w1.sent)
    assert len(table) == 0 and table.num_waiting == 0
    table.abort(["a", "nope"])  # unknown ids: nothing sent
    assert len(w0.sent) == 2
    table.check()
    assert [(i, o.new_token_ids) for i, o in drain(sub)] == [(0, [5])]


def test_a_lost_worker_fails_only_its_requests_with_a_503() -> None:
    table, w0, w1 = InFlight(), FakeWorker("w0"), FakeWorker("w1")
    sub = submit(table, ["a", "b", "c"], [w0, w1, w0])
    table.deliver([RequestOutput("c", [9])])
    table.fail_worker(w0, "no heartbeat for 1.50 s")
    assert [sorted(m.request_ids) for m in w0.sent] == [["a", "c"]]  # one message
    assert w1.sent == [] and list(table.request_ids(w1)) == ["b"]
    assert table.num_waiting == 1  # b, still waiting on w1
    table.fail_worker(w0, "again")  # nothing left there: nothing sent
    assert len(w0.sent) == 1
    table.deliver([RequestOutput("b", [1], finish_reason=FinishReason.LENGTH)])
    table.check()
    errors = [(i, o) for i, o in drain(sub) if o.finish_reason is FinishReason.ERROR]
    assert sorted(i for i, _ in errors) == [0, 2]
    for _, out in errors:
        assert out.error_status == 503
        assert out.error == "worker w0 stopped answering: no heartbeat for 1.50 s"


def test_a_duplicate_id_is_refused() -> None:
    table, w0 = InFlight(), FakeWorker("w0")
    submit(table, ["a"], [w0])
    with pytest.raises(ValueError, match="'a' is in flight already"):
        submit(table, ["a"], [w0])
    table.check()


def test_the_connection_counts_and_fails_through_the_table() -> None:
    """A real WorkerConnection (loops not started): its load and in-flight count come from
    the table; going down or restarting fails its routes there."""

    async def outputs(sub: Submission) -> list[RequestOutput]:
        return [o for items in [i async for i in sub] for _, o in items]

    async def go() -> None:
        ctx = zmq.asyncio.Context()
        table = InFlight()
        address = "tcp://127.0.0.1:40999"
        conn = WorkerConnection(ctx, address, ConnectionConfig("gw"), table, lambda *_: None)
        try:
            conn._accept(ModelInfo("m", "/m", 128, 100, "w-1"))
            assert conn.up
            sub = submit(table, ["a", "b"], [conn, conn])
            assert conn.num_inflight == 2 and conn.load == 2
            conn._accept(ModelInfo("m", "/m", 128, 100, "w-2"))  # a new process: both lost
            assert conn.num_inflight == 0 and conn.load == 0
            why = f"worker {address} stopped answering: worker w-1 restarted"
            assert [o.error for o in await outputs(sub)] == [why, why]
            sub = submit(table, ["c"], [conn])
            conn.mark_down("connection closed")
            assert conn.state is WorkerState.DOWN and len(table) == 0 and table.num_waiting == 0
            assert [o.error_status for o in await outputs(sub)] == [503]
        finally:
            conn._sock.close(linger=0)
            conn._monitor.close(linger=0)
            ctx.term()

    asyncio.run(asyncio.wait_for(go(), 5))
    with pytest.raises(ValueError, match="timeout must be > 0"):
        ConnectionConfig("gw", timeout=0)


ops = st.lists(
    st.tuples(st.sampled_from(["add", "token", "final", "abort", "lose"]), st.integers(0, 7)),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_random_paths_keep_the_table_consistent(steps: list[tuple[str, int]]) -> None:
    """A model of the table (id -> worker, started) against the real one after every op."""
    table = InFlight()
    workers = [FakeWorker(f"w{i}") for i in range(3)]
    model: dict[str, tuple[int, bool]] = {}
    added = 0
    for op, k in steps:
        live = sorted(model)
        rid = live[k % len(live)] if live else None
        if op == "add":
            rid, added = f"r{added}", added + 1
            submit(table, [rid], [workers[k % 3]])
            model[rid] = (k % 3, False)
        elif op == "token" and rid is not None:
            table.deliver([RequestOutput(rid, [1])])
            model[rid] = (model[rid][0], True)
        elif op == "final" and rid is not None:
            table.deliver([RequestOutput(rid, [1], finish_reason=FinishReason.STOP)])
            del model[rid]
        elif op == "abort" and rid is not None:
            table.abort([rid])
            del model[rid]
        elif op == "lose":
            table.fail_worker(workers[k % 3], "gone")
            model = {r: v for r, v in model.items() if v[0] != k % 3}
        table.check()
        assert set(model) == {r for r in model if r in table} and len(table) == len(model)
        assert table.num_waiting == sum(not started for _, started in model.values())
        for i, w in enumerate(workers):
            assert table.count(w) == sum(v[0] == i for v in model.values())
