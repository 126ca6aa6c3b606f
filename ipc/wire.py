"""Encoding messages as msgpack frames, and the ZeroMQ sockets that carry them.

Topology: each worker binds one ROUTER socket; each gateway connects one DEALER socket per
worker, with its gateway id as the ZeroMQ identity. The ROUTER sees every frame prefixed by
the sender's identity, so one worker can serve many gateways and address each one's outputs.

    gateway A  DEALER(id=A) --\\
                               >-- ROUTER (worker, bound at ipc:// or tcp://)
    gateway B  DEALER(id=B) --/

Frames are single msgpack messages of the tagged unions in ipc/messages.py; nothing is
pickled. Addresses: `ipc:///path/to.sock` on one host, `tcp://host:port` across hosts.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import msgspec
import zmq

from ipc.messages import ToGateway, ToWorker

# Encoders are reentrant-safe per thread only when each thread has its own; they are cheap.


class WorkerCodec:
    """The worker's side: decodes what gateways send, encodes what they receive."""

    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(ToWorker)

    def encode(self, msg: ToGateway) -> bytes:
        return self._enc.encode(msg)

    def decode(self, data: bytes | memoryview) -> ToWorker:
        return self._dec.decode(data)


class GatewayCodec:
    """The gateway's side: encodes what workers receive, decodes what they send."""

    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(ToGateway)

    def encode(self, msg: ToWorker) -> bytes:
        return self._enc.encode(msg)

    def decode(self, data: bytes | memoryview) -> ToGateway:
        return self._dec.decode(data)


def check_address(address: str) -> str:
    """Return `address` if ZeroMQ can use it here, else raise ValueError saying why."""
    if address.startswith("ipc://"):
        path = address[len("ipc://") :]
        if not path:
            raise ValueError(f"ipc address needs a path, got {address!r}")
        return address
    if address.startswith("tcp://"):
        host, sep, port = address[len("tcp://") :].rpartition(":")
        if not sep or not host or not (port.isdigit() or port == "*"):
            raise ValueError(f"tcp address must be tcp://HOST:PORT, got {address!r}")
        return address
    if address.startswith("inproc://"):
        return address
    raise ValueError(f"worker address must start with ipc:// or tcp://, got {address!r}")


def new_ipc_address(directory: str | Path | None = None, name: str = "worker") -> str:
    """A fresh `ipc://` address in a private temporary directory (socket paths are short)."""
    base = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="headrace-"))
    base.mkdir(parents=True, exist_ok=True)
    return f"ipc://{base / f'{name}-{uuid.uuid4().hex[:8]}.sock'}"


def _make_ipc_folder(address: str) -> None:
    # ZeroMQ binds over a socket file a killed worker left behind, but not into a folder
    # that does not exist.
    if address.startswith("ipc://"):
        path = Path(address[len("ipc://") :])
        path.parent.mkdir(parents=True, exist_ok=True)


def bind_router(ctx: zmq.Context, address: str) -> zmq.Socket:
    """The worker's socket. Unbounded queues: the gateways, not ZeroMQ, apply back pressure."""
    check_address(address)
    _make_ipc_folder(address)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    # A gateway that reconnects under the same id takes over its old connection.
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.bind(address)
    return sock


def connect_dealer(ctx: zmq.Context, address: str, identity: str) -> zmq.Socket:
    """A gateway's socket to one worker; reconnects on its own when the worker restarts.

    IMMEDIATE: while no connection is up, sends fail at once (zmq.Again) instead of queueing
    for a worker that may never come back.
    """
    check_address(address)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.connect(address)
    return sock


def default_worker_id() -> str:
    """Unique per worker process, so a gateway notices a restart behind the same address."""
    return f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
