"""A shared-memory ring buffer: one writer broadcasts byte messages to a fixed set of readers.

Inside a tensor-parallel group the leader publishes each step's inputs once and every
follower reads the same bytes, with no socket and no copy through the kernel. Messages are
opaque bytes (msgspec-encoded by the caller; nothing is pickled).

Layout of the segment (a file in /dev/shm, mapped by every process)::

    offset 0      header, 64 B
                  magic u32 | version u32 | num_slots u32 | slot_bytes u32 |
                  num_readers u32 | writer_pid u32 | closed u32 | (pad)
    offset 64     reader table, one 64-byte line per reader (no false sharing)
                  consumed u64 (messages read so far) | pid u32 | (pad)
    then          num_slots slots, each SLOT_HEADER + slot_bytes
                  stamp u64 (seq + 1 once the message is complete; 0 = never written) |
                  length u32 | kind u32 (INLINE: payload here; OVERFLOW: a segment name) |
                  payload [slot_bytes]

Message `seq` goes to slot `seq % num_slots`. The writer may reuse a slot only once every
reader has consumed the message that was there (`consumed > seq - num_slots`), so a slow
reader holds the writer back instead of losing messages. A message larger than a slot goes
into an overflow segment of its own whose name sits in the slot; the writer unlinks it when
the slot is reused or the ring closes.

Ordering: data is written first, then a fence, then the stamp; readers check the stamp,
fence, then read. The fence is a lock acquire/release, which is a full barrier on every
CPU CPython runs on, so weakly ordered CPUs are covered too.

Waiting: spin briefly (a step takes milliseconds; a spin keeps the latency in
microseconds), then sleep with a growing pause up to 1 ms. While waiting, the other side's
pid is checked, so a dead reader or writer raises `PeerDied` instead of hanging forever.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
import time
import uuid
from pathlib import Path

MAGIC = 0x48524E47  # "HRNG"
VERSION = 1
HEADER_BYTES = 64
READER_BYTES = 64
SLOT_HEADER = 16
INLINE, OVERFLOW = 0, 1
SPIN_ITERATIONS = 2000
MAX_SLEEP_S = 0.001
LIVENESS_EVERY_S = 0.05

_HEADER = struct.Struct("<IIIIIII")
_READER = struct.Struct("<QI")
_SLOT = struct.Struct("<QII")
_fence_lock = threading.Lock()


class PeerDied(RuntimeError):
    """The process on the other side of the ring exited while we waited for it."""


class RingClosed(EOFError):
    """The writer closed the ring and every message it published has been read."""


def _fence() -> None:
    with _fence_lock:
        pass


def _shm_dir() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not attached yet: not dead
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def _map(path: Path, size: int | None) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if size is not None else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if size is not None:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


class _Waiter:
    """Spin, then sleep with a growing pause; check the peer's liveness now and then."""

    def __init__(self, timeout: float | None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.spins = 0
        self.pause = 1e-5
        self.next_check = time.monotonic() + LIVENESS_EVERY_S

    def wait(self) -> bool:
        """Pause once; True when it is time to check the peer's liveness."""
        self.spins += 1
        if self.spins > SPIN_ITERATIONS:
            time.sleep(self.pause)
            self.pause = min(self.pause * 2, MAX_SLEEP_S)
        now = time.monotonic()
        if self.deadline is not None and now > self.deadline:
            raise TimeoutError("shared-memory ring: timed out waiting for the other side")
        if now >= self.next_check:
            self.next_check = now + LIVENESS_EVERY_S
            return True
        return False


class _Ring:
    """The mapped segment and typed access to its fields (shared by writer and readers)."""

    def __init__(self, path: Path, buf: mmap.mmap) -> None:
        self.path = path
        self.buf = buf
        magic, version, self.num_slots, self.slot_bytes, self.num_readers, _, _ = (
            _HEADER.unpack_from(buf, 0)
        )
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"{path} is not a headrace ring (magic {magic:#x}, v{version})")
        self.slots_at = HEADER_BYTES + READER_BYTES * self.num_readers
        self.stride = SLOT_HEADER + self.slot_bytes

    @staticmethod
    def size(num_slots: int, slot_bytes: int, num_readers: int) -> int:
        return HEADER_BYTES + READER_BYTES * num_readers + num_slots * (SLOT_HEADER + slot_bytes)

    def writer_pid(self) -> int:
        return int(struct.unpack_from("<I", self.buf, 20)[0])

    def closed(self) -> bool:
        return bool(struct.unpack_from("<I", self.buf, 24)[0])

    def reader(self, i: int) -> tuple[int, int]:
        consumed, pid = _READER.unpack_from(self.buf, HEADER_BYTES + READER_BYTES * i)
        return int(consumed), int(pid)

    def set_reader(self, i: int, consumed: int, pid: int) -> None:
        _READER.pack_into(self.buf, HEADER_BYTES + READER_BYTES * i, consumed, pid)

    def slot(self, seq: int) -> int:
        return self.slots_at + (seq % self.num_slots) * self.stride

    def close_map(self) -> None:
        # BufferError: a memoryview still points into the map; the OS frees it at exit.
        with contextlib.suppress(BufferError):
            self.buf.close()


class ShmRingWriter:
    """The one writer. Create it first; readers attach by `path` and their reader index."""

    def __init__(
        self,
        num_readers: int,
        *,
        num_slots: int = 8,
        slot_bytes: int = 1 << 20,
        name: str | None = None,
    ) -> None:
        for field, value, low in (
            ("num_readers", num_readers, 1),
            ("num_slots", num_slots, 2),
            ("slot_bytes", slot_bytes, 64),
        ):
            if value < low:
                raise ValueError(f"{field} must be >= {low}, got {value}")
        self.path = _shm_dir() / (name or f"headrace-ring-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        if len(self.path.name) + 24 > slot_bytes:
            raise ValueError(f"slot_bytes {slot_bytes} cannot hold an overflow segment name")
        buf = _map(self.path, _Ring.size(num_slots, slot_bytes, num_readers))
        _HEADER.pack_into(
            buf, 0, MAGIC, VERSION, num_slots, slot_bytes, num_readers, os.getpid(), 0
        )
        self._ring = _Ring(self.path, buf)
        self._seq = 0
        self._overflow: dict[int, Path] = {}  # slot index -> overflow segment it points to

    def can_publish(self) -> bool:
        """True if `publish` would not wait: every reader is past the slot's last message."""
        oldest = self._seq - self._ring.num_slots
        return all(self._ring.reader(i)[0] > oldest for i in range(self._ring.num_readers))

    def publish(self, data: bytes | memoryview, timeout: float | None = None) -> int:
        """Append one message; returns its sequence number. Waits while the ring is full."""
        ring, seq = self._ring, self._seq
        waiter = _Waiter(timeout)
        while not self.can_publish():
            if waiter.wait():
                self._check_readers(seq - ring.num_slots)
        at = ring.slot(seq)
        self._drop_overflow(seq % ring.num_slots)
        n = len(data)
        if n <= ring.slot_bytes:
            ring.buf[at + SLOT_HEADER : at + SLOT_HEADER + n] = data
            kind, length = INLINE, n
        else:
            over = self.path.with_name(f"{self.path.name}-o{seq}")
            obuf = _map(over, n)
            obuf[:n] = data
            obuf.close()
            self._overflow[seq % ring.num_slots] = over
            name = over.name.encode()
            ring.buf[at + SLOT_HEADER : at + SLOT_HEADER + len(name)] = name
            kind, length = OVERFLOW, len(name)
        struct.pack_into("<II", ring.buf, at + 8, length, kind)
        _fence()
        struct.pack_into("<Q", ring.buf, at, seq + 1)
        self._seq = seq + 1
        return seq

    def _check_readers(self, oldest: int) -> None:
        for i in range(self._ring.num_readers):
            consumed, pid = self._ring.reader(i)
            if consumed <= oldest and not _alive(pid):
                raise PeerDied(f"ring reader {i} (pid {pid}) died")

    def _drop_overflow(self, slot: int) -> None:
        over = self._overflow.pop(slot, None)
        if over is not None:
            over.unlink(missing_ok=True)

    def close(self, drain_timeout: float = 1.0) -> None:
        """Mark the ring closed and remove its files once readers have drained it.

        Readers read what was published, then get RingClosed. Overflow segments must live
        until they are read, so wait (up to drain_timeout) for live readers to catch up.
        """
        struct.pack_into("<I", self._ring.buf, 24, 1)
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and any(
            consumed < self._seq and _alive(pid) and pid > 0
            for consumed, pid in map(self._ring.reader, range(self._ring.num_readers))
        ):
            time.sleep(MAX_SLEEP_S)
        for slot in list(self._overflow):
            self._drop_overflow(slot)
        self._ring.close_map()
        self.path.unlink(missing_ok=True)


class ShmRingReader:
    """Reader `index` of a ring created by a ShmRingWriter at `path`."""

    def __init__(self, path: str | Path, index: int) -> None:
        self.path = Path(path)
        self._ring = _Ring(self.path, _map(self.path, None))
        if not 0 <= index < self._ring.num_readers:
            raise ValueError(f"index must be in [0, {self._ring.num_readers}), got {index}")
        self.index = index
        self._consumed = self._ring.reader(index)[0]
        self._ring.set_reader(index, self._consumed, os.getpid())

    def recv(self, timeout: float | None = None) -> bytes:
        """The next message. Raises RingClosed after the last one, PeerDied if the writer died."""
        ring, seq = self._ring, self._consumed
        at = ring.slot(seq)
        waiter = _Waiter(timeout)
        while struct.unpack_from("<Q", ring.buf, at)[0] != seq + 1:
            if ring.closed():
                raise RingClosed(f"ring {self.path.name} closed")
            if waiter.wait() and not _alive(ring.writer_pid()):
                raise PeerDied(f"ring writer (pid {ring.writer_pid()}) died")
        _fence()
        length, kind = struct.unpack_from("<II", ring.buf, at + 8)
        payload = bytes(ring.buf[at + SLOT_HEADER : at + SLOT_HEADER + length])
        if kind == OVERFLOW:
            obuf = _map(self.path.with_name(payload.decode()), None)
            payload = bytes(obuf)
            obuf.close()
        _fence()
        self._consumed = seq + 1
        ring.set_reader(self.index, self._consumed, os.getpid())
        return payload

    def close(self) -> None:
        self._ring.close_map()
