"""The shared-memory ring: ordered broadcast, wrap-around, oversize messages, slow and dead
peers, closing. Property tests drive one writer and several readers through random
interleavings against a model (a list of published messages per reader)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc.shm_ring import PeerDied, RingClosed, ShmRingReader, ShmRingWriter

REPO = Path(__file__).resolve().parent.parent


def message(seq: int, size: int) -> bytes:
    return bytes((seq * 31 + i) % 251 for i in range(size))


def leftover_files(writer: ShmRingWriter) -> list[Path]:
    return sorted(writer.path.parent.glob(writer.path.name + "*"))


@settings(max_examples=60, deadline=None)
@given(
    num_readers=st.integers(1, 3),
    num_slots=st.integers(2, 5),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("publish"), st.integers(0, 300)),
            st.tuples(st.just("read"), st.integers(0, 2)),
        ),
        max_size=80,
    ),
)
def test_random_interleavings_match_a_model(
    num_readers: int, num_slots: int, ops: list[tuple[str, int]]
) -> None:
    # slot_bytes 128: sizes up to 300 exercise inline and overflow messages alike.
    writer = ShmRingWriter(num_readers, num_slots=num_slots, slot_bytes=128)
    readers = [ShmRingReader(writer.path, i) for i in range(num_readers)]
    published: list[bytes] = []
    read = [0] * num_readers
    for op, arg in ops:
        if op == "publish":
            full = len(published) - min(read) >= num_slots
            assert writer.can_publish() == (not full)
            if full:
                with pytest.raises(TimeoutError):
                    writer.publish(b"x", timeout=0.0)
                continue
            data = message(len(published), arg)
            assert writer.publish(data) == len(published)
            published.append(data)
        else:
            r = arg % num_readers
            if read[r] == len(published):
                with pytest.raises(TimeoutError):
                    readers[r].recv(timeout=0.0)
                continue
            assert readers[r].recv() == published[read[r]]
            read[r] += 1
    for r, reader in enumerate(readers):
        while read[r] < len(published):
            assert reader.recv() == published[read[r]]
            read[r] += 1
    writer.close()
    for reader in readers:
        with pytest.raises(RingClosed):
            reader.recv(timeout=1.0)
        reader.close()
    assert leftover_files(writer) == []


def test_wrap_around_with_threads_in_lockstep() -> None:
    writer = ShmRingWriter(2, num_slots=3, slot_bytes=256)
    got: list[list[bytes]] = [[], []]

    def consume(i: int) -> None:
        reader = ShmRingReader(writer.path, i)
        try:
            while True:
                got[i].append(reader.recv(timeout=10))
        except RingClosed:
            reader.close()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    sent = [message(i, i % 700) for i in range(200)]  # many laps of 3 slots, some oversize
    for data in sent:
        writer.publish(data, timeout=10)
    writer.close(drain_timeout=10)
    for t in threads:
        t.join(10)
    assert got == [sent, sent]
    assert leftover_files(writer) == []


def test_slow_reader_holds_the_writer_back_without_losing_messages() -> None:
    writer = ShmRingWriter(2, num_slots=2, slot_bytes=64)
    fast, slow = ShmRingReader(writer.path, 0), ShmRingReader(writer.path, 1)
    writer.publish(b"a")
    writer.publish(b"b")
    assert fast.recv() == b"a" and fast.recv() == b"b"
    with pytest.raises(TimeoutError):  # slow has read nothing: slot 0 is still its
        writer.publish(b"c", timeout=0.05)

    def late() -> None:
        time.sleep(0.1)
        assert slow.recv() == b"a"

    t = threading.Thread(target=late)
    t.start()
    writer.publish(b"c", timeout=5)  # unblocks once slow has read "a"
    t.join()
    assert fast.recv() == b"c"
    assert slow.recv() == b"b" and slow.recv() == b"c"
    writer.close()


def _python(code: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)


def test_dead_reader_is_detected_by_the_writer() -> None:
    writer = ShmRingWriter(1, num_slots=2, slot_bytes=64)
    proc = _python(
        "import sys, time; from ipc.shm_ring import ShmRingReader\n"
        f"r = ShmRingReader({str(writer.path)!r}, 0); print('up', flush=True); time.sleep(60)"
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    writer.publish(b"1")
    writer.publish(b"2")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(PeerDied, match="reader 0"):
        writer.publish(b"3", timeout=5)
    writer.close(drain_timeout=0)


def test_dead_writer_is_detected_by_a_reader(tmp_path: Path) -> None:
    marker = tmp_path / "path"
    proc = _python(
        "import time; from ipc.shm_ring import ShmRingWriter\n"
        "w = ShmRingWriter(1, num_slots=2, slot_bytes=64)\n"
        f"open({str(marker)!r}, 'w').write(str(w.path)); w.publish(b'hello')\n"
        "print('up', flush=True); time.sleep(60)"
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    path = Path(marker.read_text())
    reader = ShmRingReader(path, 0)
    assert reader.recv(timeout=5) == b"hello"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(PeerDied, match="writer"):
        reader.recv(timeout=5)
    reader.close()
    path.unlink()


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="num_readers"):
        ShmRingWriter(0)
    with pytest.raises(ValueError, match="num_slots"):
        ShmRingWriter(1, num_slots=1)
    writer = ShmRingWriter(1, num_slots=2, slot_bytes=64)
    with pytest.raises(ValueError, match="index"):
        ShmRingReader(writer.path, 1)
    writer.close(drain_timeout=0)
