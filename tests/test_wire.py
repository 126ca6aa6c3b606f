"""ipc/: every message survives msgpack, addresses are checked, and a worker server on real
ZeroMQ sockets answers Hello, runs requests of a fake engine, batches outputs per step,
heartbeats, and aborts a silent gateway's requests."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest
import zmq

from ipc.messages import (
    AbortRequests,
    EngineOutputs,
    EngineRequest,
    FinishReason,
    Heartbeat,
    Hello,
    ModelInfo,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
    WorkerStats,
)
from ipc.wire import GatewayCodec, WorkerCodec, check_address, connect_dealer
from worker.server import WorkerServer


def test_every_message_round_trips() -> None:
    gw, wk = GatewayCodec(), WorkerCodec()
    params = SamplingParams(n=1, temperature=0.5, stop=["\n"], logprobs=2, seed=3)
    to_worker = [
        EngineRequest("r1", [1, 2, 3], params, 12.5),
        AbortRequests(["r1", "r2"]),
        Hello("gw-1"),
    ]
    for msg in to_worker:
        assert wk.decode(gw.encode(msg)) == msg
    out = RequestOutput(
        "r1",
        [5, 6],
        [TokenLogprobs([5, 7], [-0.1, -2.0], 1), TokenLogprobs([6], [-0.3], 2)],
        [None, TokenLogprobs([2], [-1.0], 4)],
        FinishReason.STOP,
        stop_reason=2,
        num_prompt_tokens=3,
    )
    stats = WorkerStats(num_running=1, num_free_blocks=9, num_total_blocks=10)
    to_gateway = [
        EngineOutputs([out], stats, 1.0),
        Heartbeat("w", stats, 2.0),
        ModelInfo("m", "/p", 512, 512, "w", None, 20),
    ]
    for msg in to_gateway:
        assert gw.decode(wk.encode(msg)) == msg
    assert gw.decode(wk.encode(EngineOutputs([out]))).outputs[0].finish_reason is FinishReason.STOP


def test_undecodable_frame_raises() -> None:
    with pytest.raises(msgspec.DecodeError):
        WorkerCodec().decode(b"\xc1garbage")


@pytest.mark.parametrize(
    "address", ["ipc:///tmp/x.sock", "tcp://127.0.0.1:5550", "tcp://[::1]:1", "tcp://h:*"]
)
def test_good_addresses(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize("address", ["", "ipc://", "tcp://host", "http://x:1", "tcp://:80"])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        check_address(address)


class FakeEngine:
    """Emits token 10, 11, ... one per step until max_tokens; logs what it was asked."""

    def __init__(self) -> None:
        self.model_info = ModelInfo("fake", "/fake", 64, 100, "")
        self.running: dict[str, list[int]] = {}
        self.limits: dict[str, int] = {}
        self.owners: dict[str, bytes] = {}
        self.aborted: list[str] = []
        self.steps = 0

    def add_request(self, req: EngineRequest, owner: bytes = b"") -> RequestOutput | None:
        if len(req.prompt_token_ids) >= 64:
            return RequestOutput(req.request_id, finish_reason=FinishReason.ERROR, error="long")
        self.running[req.request_id] = []
        self.limits[req.request_id] = req.params.max_tokens or 8
        self.owners[req.request_id] = owner
        return None

    def abort_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if self.running.pop(rid, None) is not None:
                self.aborted.append(rid)

    def step_with_owners(self) -> list[tuple[bytes, RequestOutput]]:
        self.steps += 1
        time.sleep(0.005)
        outs = []
        for rid, toks in list(self.running.items()):
            toks.append(10 + len(toks))
            done = len(toks) >= self.limits[rid]
            reason = FinishReason.LENGTH if done else None
            outs.append((self.owners[rid], RequestOutput(rid, [toks[-1]], finish_reason=reason)))
            if done:
                del self.running[rid]
        return outs

    def owner_of(self, request_id: str) -> bytes | None:
        return self.owners[request_id] if request_id in self.running else None

    def request_ids(self, owner: bytes | None = None) -> list[str]:
        return [r for r in self.running if owner is None or self.owners[r] == owner]

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def stats(self) -> WorkerStats:
        return WorkerStats(num_running=len(self.running), num_free_blocks=10, num_total_blocks=10)


def _recv_all(sock: zmq.Socket, codec: GatewayCodec, until: float) -> list:
    msgs = []
    while time.monotonic() < until:
        if sock.poll(20):
            msgs.append(codec.decode(sock.recv()))
    return msgs


def test_worker_server_over_real_sockets(tmp_path: Path) -> None:
    engine = FakeEngine()
    address = f"ipc://{tmp_path}/w.sock"
    server = WorkerServer(lambda: engine, address, heartbeat_interval=0.05, gateway_timeout=0.5)
    server.start()
    ctx = zmq.Context()
    a = connect_dealer(ctx, address, "gw-a")
    b = connect_dealer(ctx, address, "gw-b")
    codec = GatewayCodec()
    try:
        time.sleep(0.2)  # IMMEDIATE sockets send only once connected
        for sock, name in ((a, "gw-a"), (b, "gw-b")):
            sock.send(codec.encode(Hello(name)))
            info = codec.decode(sock.recv())
            assert isinstance(info, ModelInfo) and info.worker_id == server.worker_id
        params = SamplingParams(max_tokens=4)
        a.send(codec.encode(EngineRequest("a1", [1, 2], params)))
        a.send(codec.encode(EngineRequest("a2", [1, 2], params)))
        b.send(codec.encode(EngineRequest("b1", [1] * 70, params)))  # rejected
        msgs_a = _recv_all(a, codec, time.monotonic() + 0.6)
        msgs_b = _recv_all(b, codec, time.monotonic() + 0.1)
        outs_a = [o for m in msgs_a if isinstance(m, EngineOutputs) for o in m.outputs]
        assert sorted(o.request_id for o in outs_a if o.finished) == ["a1", "a2"]
        tokens = [t for o in outs_a if o.request_id == "a1" for t in o.new_token_ids]
        assert tokens == [10, 11, 12, 13]
        # Batched: a step's outputs for one gateway travel in one EngineOutputs.
        assert any(len(m.outputs) == 2 for m in msgs_a if isinstance(m, EngineOutputs))
        assert any(isinstance(m, Heartbeat) for m in msgs_a)
        errors = [o for m in msgs_b if isinstance(m, EngineOutputs) for o in m.outputs]
        assert [(o.request_id, o.finish_reason) for o in errors] == [("b1", FinishReason.ERROR)]
        assert not any(o.request_id.startswith("a") for o in errors)  # a's outputs stay a's

        # Abort: only the owner can abort; the engine frees it.
        a.send(codec.encode(EngineRequest("a3", [1], SamplingParams(max_tokens=60))))
        time.sleep(0.05)
        b.send(codec.encode(AbortRequests(["a3"])))
        time.sleep(0.05)
        assert "a3" not in engine.aborted
        a.send(codec.encode(AbortRequests(["a3"])))
        time.sleep(0.1)
        assert "a3" in engine.aborted

        # A gateway that goes silent (no keepalive Hello) has its requests aborted.
        b.send(codec.encode(Hello("gw-b")))
        b.send(codec.encode(EngineRequest("b2", [1], SamplingParams(max_tokens=2000))))
        deadline = time.monotonic() + 3
        while "b2" not in engine.aborted and time.monotonic() < deadline:
            a.send(codec.encode(Hello("gw-a")))  # a stays alive
            time.sleep(0.1)
        assert "b2" in engine.aborted
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
        server.stop()
