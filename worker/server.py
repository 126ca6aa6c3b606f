"""The worker process: one engine behind one ZeroMQ ROUTER socket.

Three threads, so socket work overlaps GPU work and the GPU loop never encodes or waits on
a socket:

    zmq-io      owns the ROUTER socket: decodes requests and aborts into `inbox`, answers
                Hello with ModelInfo, forwards encoded frames from zmq-out to gateways
    engine      builds the engine, then loops: drain inbox -> engine.step() -> outbox
    zmq-out     groups each step's outputs, one EngineOutputs per gateway, encodes, sends
                heartbeats (WorkerStats) to every known gateway every interval

    gateway --ROUTER--> zmq-io --inbox--> engine --outbox--> zmq-out --inproc--> zmq-io --> gateway

The main thread only waits for SIGTERM/SIGINT; the first one drains (new requests get a
503, those in flight finish for up to `--shutdown-timeout` seconds), a second one stops at
once. `worker/admission.py` refuses requests past the queue limits. Gateways send Hello when they connect and
every second after (keepalive); a gateway silent for `gateway_timeout` is presumed dead and
its requests are aborted so their KV blocks return to the pool.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Protocol

import msgspec
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
    WorkerStats,
)
from ipc.wire import WorkerCodec, bind_router, default_worker_id
from worker import serve_timeline
from worker.admission import Admission, AdmissionLimits
from worker.errors import FatalEngineError
from worker.health_http import serve_health, worker_health
from worker.request import OwnedOutput

logger = logging.getLogger("headrace.worker")


class Engine(Protocol):
    """What the worker needs from worker.engine.EngineCore (tests use a fake). The engine
    owns the requests: each remembers its owner, the gateway identity that sent it."""

    model_info: ModelInfo

    def add_request(self, req: EngineRequest, owner: bytes = b"") -> RequestOutput | None: ...
    def abort_requests(self, request_ids: list[str]) -> None: ...
    def step_with_owners(self) -> list[OwnedOutput]:
        """One step's outputs, each with its request's owner."""
        ...

    def owner_of(self, request_id: str) -> bytes | None:
        """The owner of an unfinished request; None if there is none."""
        ...

    def request_ids(self, owner: bytes | None = None) -> list[str]:
        """The unfinished requests, only `owner`'s if given."""
        ...

    def has_unfinished_requests(self) -> bool: ...
    def stats(self) -> WorkerStats: ...


class _GatewayGone:
    """Inbox marker from zmq-io: this gateway stopped sending keepalives."""


_GONE = _GatewayGone()
Inbox = queue.Queue[tuple[bytes, EngineRequest | AbortRequests | _GatewayGone]]
Outbox = queue.SimpleQueue[list[OwnedOutput] | None]  # a step's outputs, grouped by zmq-out


class WorkerServer:
    """Serves one engine at `address` until `stop()`."""

    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        address: str,
        *,
        worker_id: str | None = None,
        heartbeat_interval: float = 0.1,
        gateway_timeout: float = 10.0,
        tokenizer: str | None = None,
        max_logprobs: int | None = None,
        admission: AdmissionLimits | None = None,
        shutdown_timeout: float = 30.0,
        health: tuple[str, int] | None = None,
    ) -> None:
        self.engine_factory = engine_factory
        self.admission = Admission(admission or AdmissionLimits())
        self.shutdown_timeout = shutdown_timeout
        self.num_owned = 0  # the engine's requests, for the drain (written by the engine thread)
        self.health = health  # (host, port) of the HTTP /health endpoint, if any
        self.address = address
        self.worker_id = worker_id or default_worker_id()
        self.heartbeat_interval = heartbeat_interval
        self.gateway_timeout = gateway_timeout
        self.tokenizer = tokenizer
        self.max_logprobs = max_logprobs
        self.model_info: ModelInfo | None = None
        self.stats = WorkerStats()  # latest snapshot, written by the engine thread only
        # The load report (see _load_report): the engine's latest stats with how many
        # requests the engine loop had taken from the inbox by then (one tuple, swapped
        # in whole), and per gateway the requests that reached the socket (zmq-io counts
        # them under _gateways_lock).
        self._published: tuple[WorkerStats, int] = (self.stats, 0)
        self._arrived: dict[bytes, int] = {}
        self._arrived_total = 0

        self._ctx = zmq.Context()
        self._forward_addr = f"inproc://worker-out-{id(self)}"
        self._inbox: Inbox = queue.Queue()
        self._outbox: Outbox = queue.SimpleQueue()
        self._gateways: dict[bytes, float] = {}  # identity -> last time heard
        self._gateways_lock = threading.Lock()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._health_server: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Build the engine (in its own thread), then bind and start the socket threads."""
        if self.health is not None:  # first: a probe sees "loading" while the model loads
            self._health_server = serve_health(*self.health, lambda: worker_health(self))
        engine_thread = threading.Thread(target=self._engine_main, name="engine", daemon=True)
        engine_thread.start()
        self._threads.append(engine_thread)
        self._ready.wait()
        if self._failure is not None:
            raise RuntimeError("engine failed to start") from self._failure
        pull = self._ctx.socket(zmq.PULL)
        pull.bind(self._forward_addr)
        router = bind_router(self._ctx, self.address)
        for name, target, sock in (("zmq-io", self._io_main, (router, pull)),):
            t = threading.Thread(target=target, args=sock, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._out_main, name="zmq-out", daemon=True)
        t.start()
        self._threads.append(t)
        logger.info("worker %s serving %s at %s", self.worker_id, self._model_name(), self.address)
        from worker import progress

        progress.note(f"serving {self._model_name()} at {self.address}")

    def stop(self) -> None:
        if self._health_server is not None:
            self._health_server.shutdown()
        self._stopping.set()
        self._outbox.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self._ctx.term()

    def serve_forever(self, parent_pid: int | None = None) -> None:
        """start(), then block until SIGTERM or SIGINT (or, given `parent_pid`, until that
        process is gone: a worker of `headrace serve` must not outlive it)."""
        signals = 0
        done = threading.Event()

        def on_signal(*_: object) -> None:
            nonlocal signals
            signals += 1
            done.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        self.start()
        while not done.wait(0.5):
            if self._failure is not None:
                break
            if parent_pid is not None and os.getppid() != parent_pid:
                logger.warning("parent process %d is gone: stopping", parent_pid)
                break
        if signals:
            self._drain(lambda: signals > 1)
        elif isinstance(self._failure, FatalEngineError):
            time.sleep(3 * self.heartbeat_interval)  # the failed requests' errors leave first
        self.stop()
        if self._failure is not None:
            raise RuntimeError("engine loop failed") from self._failure

    def _drain(self, cut_short: Callable[[], bool]) -> None:
        """Refuse new requests; wait for those in flight (or the timeout, or a 2nd signal)."""
        self.admission.draining = True
        logger.warning(
            "draining: %d requests in flight, up to %.0f s (--shutdown-timeout)",
            self.num_owned,
            self.shutdown_timeout,
        )
        deadline = time.monotonic() + self.shutdown_timeout
        while self.num_owned and time.monotonic() < deadline and not cut_short():
            if self._failure is not None:
                return
            time.sleep(0.05)
        if self.num_owned:
            logger.warning("shutdown: cutting %d requests short", self.num_owned)
        time.sleep(2 * self.heartbeat_interval)  # the last outputs leave through zmq-out

    def _model_name(self) -> str:
        return self.model_info.model_name if self.model_info else "?"

    # ---------------------------------------------------------------- engine thread

    def _engine_main(self) -> None:
        try:
            engine = self.engine_factory()
            info = _with_identity(
                engine.model_info, self.worker_id, self.tokenizer, self.max_logprobs
            )
            limits = self.admission.limits
            self.model_info = msgspec.structs.replace(
                info,
                max_num_queued_reqs=limits.max_num_queued_reqs,
                max_num_queued_tokens=limits.max_num_queued_tokens,
            )
            self.stats = self._stats(engine)
        except BaseException as e:
            self._failure = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._engine_loop(engine)
        except BaseException as e:
            logger.exception("engine loop died")
            self._failure = e

    def _engine_loop(self, engine: Engine) -> None:
        taken = 0  # requests taken from the inbox so far
        timeline = serve_timeline.from_env(engine)  # HEADRACE_STEP_TIMELINE: None without
        clock = time.perf_counter
        while not self._stopping.is_set() and self._failure is None:
            busy = engine.has_unfinished_requests()
            # Rejections, made outside step(), go back to their sender directly: a request
            # rejected for a duplicate id must not take the running one's owner.
            outputs: list[OwnedOutput] = []
            inbox = self._drain_inbox(block=not busy)
            t0, before = clock(), taken
            for ident, msg in inbox:
                taken += isinstance(msg, EngineRequest)
                outputs.extend(self._handle(engine, ident, msg))
            rejected, t1 = bool(outputs), clock()
            if timeline is not None:
                timeline.arrived(taken - before, t0)
            stepping = engine.has_unfinished_requests()
            outputs += self._step(engine) if stepping else []
            t2 = clock()
            if stepping or rejected or busy:
                self.stats = self._stats(engine)
            if inbox or busy:
                self._published = (self.stats, taken)
            t3 = clock()
            if outputs:
                self._outbox.put(outputs)  # zmq-out groups, encodes and sends them
            self.num_owned = len(engine.request_ids())
            if timeline is not None:
                timeline.passed(outputs, (t0, t1, t2, t3, clock()), self.num_owned > 0)

    def _step(self, engine: Engine) -> list[OwnedOutput]:
        """One engine step, failing every request if it raises; then the queue's deadline."""
        try:
            outputs = engine.step_with_owners()
        except Exception as e:
            outputs = self._fail_all(engine, traceback.format_exc(), e)
        self.admission.started([out for _, out in outputs])
        late = self.admission.expired()
        if late:
            owners = [(engine.owner_of(out.request_id), out) for out in late]
            owned = [(o, out) for o, out in owners if o is not None]
            engine.abort_requests([out.request_id for out in late])
            outputs += owned
        return outputs

    def _stats(self, engine: Engine) -> WorkerStats:
        a = self.admission
        return msgspec.structs.replace(
            engine.stats(),
            num_queued=len(a.queued),
            num_queued_tokens=a.queued_tokens,
            num_refused=a.num_refused,
            draining=a.draining,
        )

    def _drain_inbox(
        self, block: bool
    ) -> list[tuple[bytes, EngineRequest | AbortRequests | _GatewayGone]]:
        items = []
        try:
            if block:
                items.append(self._inbox.get(timeout=0.05))
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return items

    def _handle(
        self, engine: Engine, ident: bytes, msg: EngineRequest | AbortRequests | _GatewayGone
    ) -> list[OwnedOutput]:
        if isinstance(msg, EngineRequest):
            rid = msg.request_id
            if (refused := self.admission.refuse(msg)) is not None:
                return [(ident, refused)]
            try:
                rejected = engine.add_request(msg, owner=ident)  # checks the id is not in use
            except Exception as e:  # a bad request must not take the worker down
                rejected = _error_output(rid, f"{type(e).__name__}: {e}")
            if rejected is not None:
                if engine.owner_of(rid) is None:  # a duplicate id leaves the running one queued
                    self.admission.forget(rid)
                return [(ident, rejected)]
            return []
        if isinstance(msg, AbortRequests):
            ids = [rid for rid in msg.request_ids if engine.owner_of(rid) == ident]
        else:
            ids = engine.request_ids(owner=ident)
            if ids:
                logger.warning("gateway %r went silent: aborting %d requests", ident, len(ids))
        for rid in ids:
            self.admission.forget(rid)
        if ids:
            engine.abort_requests(ids)
        return []

    def _fail_all(self, engine: Engine, why: str, e: Exception) -> list[OwnedOutput]:
        if isinstance(e, FatalEngineError):  # the worker exits; its supervisor restarts it
            self._failure = e
        ids = engine.request_ids()
        logger.error("engine step failed; failing %d requests:\n%s", len(ids), why)
        owned = [(o, rid) for rid in ids if (o := engine.owner_of(rid)) is not None]
        try:
            engine.abort_requests(ids)
        except Exception:
            logger.exception("abort after a failed step failed too")
        msg = f"the worker failed: {e}" if self._failure else "internal error in the engine step"
        return [(o, _error_output(rid, msg)) for o, rid in owned]

    # ---------------------------------------------------------------- socket threads

    def _io_main(self, router: zmq.Socket, pull: zmq.Socket) -> None:
        codec = WorkerCodec()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        last_sweep = time.monotonic()
        try:
            while not self._stopping.is_set():
                events = dict(poller.poll(100))
                if pull in events:
                    while True:
                        try:
                            frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        router.send_multipart(frames, copy=False)
                if router in events:
                    while True:
                        try:
                            ident, payload = router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        except ValueError:  # not two frames: not one of ours
                            continue
                        self._on_message(router, codec, ident, payload)
                now = time.monotonic()
                if now - last_sweep > 1.0:
                    last_sweep = now
                    self._sweep_gateways(now)
        finally:
            router.close(linger=0)
            pull.close(linger=0)

    def _on_message(
        self, router: zmq.Socket, codec: WorkerCodec, ident: bytes, payload: bytes
    ) -> None:
        try:
            msg = codec.decode(payload)
        except Exception as e:
            logger.warning("dropping an undecodable frame from %r: %s", ident, e)
            return
        with self._gateways_lock:
            known = ident in self._gateways
            self._gateways[ident] = time.monotonic()
            if isinstance(msg, EngineRequest):
                self._arrived[ident] = self._arrived.get(ident, 0) + 1
                self._arrived_total += 1
        if isinstance(msg, Hello):
            if not known:
                logger.info("gateway %s connected", msg.gateway_id)
            assert self.model_info is not None  # sockets start after the engine is built
            router.send_multipart([ident, codec.encode(self.model_info)])
        else:
            self._inbox.put((ident, msg))

    def _sweep_gateways(self, now: float) -> None:
        with self._gateways_lock:
            gone = [g for g, t in self._gateways.items() if now - t > self.gateway_timeout]
            for g in gone:
                del self._gateways[g]
                self._arrived.pop(g, None)  # it comes back (if ever) counting afresh
        for g in gone:
            self._inbox.put((g, _GONE))

    def _out_main(self) -> None:
        codec = WorkerCodec()
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(self._forward_addr)
        next_beat = time.monotonic()
        try:
            while not self._stopping.is_set():
                timeout = max(0.0, next_beat - time.monotonic())
                try:
                    batch = self._outbox.get(timeout=timeout)
                except queue.Empty:
                    batch = []
                if batch is None:
                    break
                for ident, outs in self._group_by_gateway(batch):
                    push.send_multipart([ident, codec.encode(outs)], copy=False)
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.heartbeat_interval
                    self._send_heartbeats(codec, push)
        finally:
            push.close(linger=0)

    def _load_report(self, idents: list[bytes]) -> tuple[WorkerStats, list[int]]:
        """The published stats plus the requests still in the inbox (arrived at
        the socket, not yet taken by the engine loop), and per gateway how many of its
        requests have arrived. Every request a gateway sent is then counted once: on the
        wire (by that gateway alone), in the inbox, or in the engine's running + waiting."""
        stats, taken = self._published
        with self._gateways_lock:
            inbox = self._arrived_total - taken
            arrived = [self._arrived.get(ident, 0) for ident in idents]
        if inbox > 0:
            stats = msgspec.structs.replace(stats, num_inbox=inbox)
        if self.admission.draining and not stats.draining:  # SIGTERM while idle
            stats = msgspec.structs.replace(stats, draining=True)
        return stats, arrived

    def _send_heartbeats(self, codec: WorkerCodec, push: zmq.Socket) -> None:
        with self._gateways_lock:
            idents = list(self._gateways)
        stats, arrived = self._load_report(idents)
        now = time.time()
        for ident, n in zip(idents, arrived, strict=True):
            push.send_multipart([ident, codec.encode(Heartbeat(self.worker_id, stats, now, n))])

    def _group_by_gateway(self, outputs: list[OwnedOutput]) -> list[tuple[bytes, EngineOutputs]]:
        """One EngineOutputs per gateway for this step."""
        by_gateway: dict[bytes, list[RequestOutput]] = {}
        for ident, out in outputs:
            by_gateway.setdefault(ident, []).append(out)
        idents = list(by_gateway)
        stats, arrived = self._load_report(idents)
        now = time.time()
        return [
            (g, EngineOutputs(by_gateway[g], stats, now, n))
            for g, n in zip(idents, arrived, strict=True)
        ]


def _with_identity(
    info: ModelInfo, worker_id: str, tokenizer: str | None, max_logprobs: int | None
) -> ModelInfo:
    return msgspec.structs.replace(
        info,
        worker_id=worker_id,
        tokenizer=tokenizer or info.tokenizer,
        max_logprobs=info.max_logprobs if max_logprobs is None else max_logprobs,
    )


def _error_output(request_id: str, message: str) -> RequestOutput:
    return RequestOutput(request_id, finish_reason=FinishReason.ERROR, error=message)
