"""One gateway's connection to one worker: the socket, its health, and reconnecting.

States:

    CONNECTING --ModelInfo--> UP --silent > timeout, or socket disconnect--> DOWN
        ^                                                                   |
        +------------------------ Hello every 0.2 s ------------------------+

While not UP the gateway sends Hello every `hello_interval`; ZeroMQ reconnects the socket
by itself, so a worker restarted at the same address is used again with no gateway
restart. While UP, a Hello every second is the gateway's keepalive (the worker aborts the
requests of gateways it stops hearing from). A new worker id behind the same address means
the worker restarted: whatever was in flight there is lost and fails at once.

A worker removed from the gateway's list is `draining`: it gets no new requests, and its
connection closes once the streams it still serves have finished.

Load: every heartbeat and output batch carries the worker's own report (running, waiting,
KV blocks: the same numbers every gateway sees) and how many of this gateway's requests
that report already includes, so requests sent since count too:

    load = running + waiting + queued (the worker's, all gateways) + sent here, not reported
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ipc.messages import (
    EngineOutputs,
    EngineRequest,
    Heartbeat,
    Hello,
    ModelInfo,
    ToWorker,
    WorkerStats,
)
from ipc.wire import GatewayCodec, connect_dealer

if TYPE_CHECKING:
    from gateway.inflight import InFlight

logger = logging.getLogger("headrace.gateway")


class WorkerState(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class ConnectionConfig:
    """How this gateway talks to every worker."""

    gateway_id: str  # this gateway's socket identity: the worker's key for its requests
    timeout: float = 1.0  # seconds of silence before a worker counts as down
    hello_interval: float = 0.2  # seconds between Hellos while a worker is not up
    keepalive_interval: float = 1.0  # seconds between Hellos while it is up

    def __post_init__(self) -> None:
        for name in ("timeout", "hello_interval", "keepalive_interval"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"the worker connection's {name} must be > 0, got {value}")


class WorkerConnection:
    """A DEALER socket to one worker plus what the gateway knows about that worker."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        address: str,
        config: ConnectionConfig,
        inflight: InFlight,
        on_model_info: Callable[[WorkerConnection, ModelInfo], None],
    ) -> None:
        self.address = address
        self.config = config
        self.state = WorkerState.CONNECTING
        self.info: ModelInfo | None = None
        self.stats = WorkerStats()
        self.draining = False  # removed from the list: no new requests, closes when idle
        self.sent = 0  # requests this gateway has sent to the current worker process
        self.reported = 0  # how many of them the worker's latest stats include
        self.last_seen = 0.0
        self._inflight = inflight  # the gateway's requests (outputs go there)
        self._on_model_info = on_model_info
        self._codec = GatewayCodec()
        # An asyncio context makes asyncio sockets.
        self._sock: zmq.asyncio.Socket = connect_dealer(ctx, address, config.gateway_id)  # type: ignore[arg-type,assignment]
        self._monitor: zmq.asyncio.Socket = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def up(self) -> bool:
        return self.state is WorkerState.UP

    @property
    def worker_id(self) -> str | None:
        return self.info.worker_id if self.info is not None else None

    @property
    def routable(self) -> bool:
        """Up and not draining: may take new requests."""
        return self.state is WorkerState.UP and not self.draining

    @property
    def num_inflight(self) -> int:
        """This gateway's requests in flight there."""
        return self._inflight.count(self)

    @property
    def load(self) -> int:
        """Requests ahead of a new one: the worker's own count (every gateway's requests)
        plus ours that its latest report does not include yet."""
        unreported = max(0, self.sent - self.reported)
        s = self.stats
        # Not num_queued (admitted, no first token yet): those are in running + waiting.
        reported = s.num_running + s.num_waiting + s.num_inbox
        return max(self.num_inflight, reported + unreported)

    def _report(self, stats: WorkerStats, received: int) -> None:
        self.stats = stats
        if received < self.reported or received > self.sent:
            # The worker forgot us (it restarted, or timed us out), or counted this
            # gateway's earlier connection too (a worker removed and added again): either
            # way nothing of ours is pending beyond its count.
            self.sent = received
        self.reported = received

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._recv_loop()),
            asyncio.ensure_future(self._hello_loop()),
            asyncio.ensure_future(self._watch_loop()),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def send(self, msg: ToWorker) -> bool:
        """Send without waiting; False when no connection to the worker is up.

        Through the asyncio socket itself (a NOBLOCK send resolves at once): a send on a
        plain shadow socket would swallow ZeroMQ's edge-triggered read signal and leave
        the receive loop asleep with messages waiting.
        """
        fut: asyncio.Future[None] = self._sock.send(self._codec.encode(msg), zmq.NOBLOCK)  # type: ignore[assignment]
        ok = not (fut.done() and fut.exception() is not None)
        if ok and isinstance(msg, EngineRequest):
            self.sent += 1
        return ok

    def mark_down(self, why: str) -> None:
        if self.state is WorkerState.DOWN:
            return
        was_up = self.state is WorkerState.UP
        self.state = WorkerState.DOWN
        if was_up or self.num_inflight:
            logger.warning("worker %s is down: %s", self.address, why)
        self._inflight.fail_worker(self, why)

    # ------------------------------------------------------------------ loops

    async def _recv_loop(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                msg = self._codec.decode(data)
            except Exception as e:
                logger.warning("dropping an undecodable frame from %s: %s", self.address, e)
                continue
            self.last_seen = time.monotonic()
            if isinstance(msg, EngineOutputs):
                if msg.stats is not None:
                    self._report(msg.stats, msg.received)
                self._inflight.deliver(msg.outputs)
            elif isinstance(msg, Heartbeat):
                self._report(msg.stats, msg.received)
                if self.info is None or msg.worker_id != self.info.worker_id:
                    # A worker we have not been introduced to (it restarted): ask who it is.
                    self.send(Hello(self.config.gateway_id))
            else:
                self._accept(msg)

    def _accept(self, info: ModelInfo) -> None:
        if self.info is not None and info.worker_id != self.info.worker_id:
            self._inflight.fail_worker(self, f"worker {self.info.worker_id} restarted")
        if self.state is not WorkerState.UP:
            logger.info("worker %s is up: %s (%s)", self.address, info.model_name, info.worker_id)
        self.info = info
        self.state = WorkerState.UP
        self._on_model_info(self, info)

    async def _hello_loop(self) -> None:
        while True:
            c = self.config
            self.send(Hello(c.gateway_id))
            await asyncio.sleep(c.keepalive_interval if self.up else c.hello_interval)

    async def _watch_loop(self) -> None:
        """Down on socket disconnect (immediate) or on silence longer than `timeout`."""
        monitor = asyncio.ensure_future(self._monitor_loop())
        try:
            timeout = self.config.timeout
            interval = min(0.05, timeout / 4)
            while True:
                before = time.monotonic()
                await asyncio.sleep(interval)
                now = time.monotonic()
                silent = now - self.last_seen
                # If this loop itself woke late, the event loop was stalled (an overloaded
                # gateway): heartbeats may be sitting unread in the socket. Give the
                # receive loop a turn before calling a live worker dead.
                stalled = now - before - interval > timeout / 2
                if self.up and silent > timeout and not stalled:
                    self.mark_down(f"no heartbeat for {silent:.2f} s")
        finally:
            monitor.cancel()

    async def _monitor_loop(self) -> None:
        while True:
            frames = await self._monitor.recv_multipart()
            event = parse_monitor_message(frames)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.mark_down("connection closed")
