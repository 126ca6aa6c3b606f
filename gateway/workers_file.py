"""`--workers-file`: a list of worker addresses the gateway re-reads when it changes, so
workers join and leave without a gateway restart.

The file holds one ZeroMQ address per line (`tcp://host:port` or `ipc:///path`); blank
lines and `#` comments are ignored. Every second the gateway looks at the file's size and
modification time; when they change it reads the file again, adds the addresses that
appeared and drains the ones that disappeared (no new requests; dropped once their streams
have finished). A file that cannot be read or has a bad line is reported in the log and
changes nothing: a typo must not take every worker away from a running gateway.

Edit it atomically (write a new file, then `mv` it over the old one) so the gateway never
reads half a file.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

logger = logging.getLogger("headrace.gateway")

SCHEMES = ("tcp://", "ipc://")


class WorkerList(Protocol):
    def add_worker(self, address: str) -> bool: ...
    def remove_worker(self, address: str) -> bool: ...


def check_worker_address(address: str, where: str = "worker address") -> str:
    """The address, stripped; ValueError naming `where` if it is not a ZeroMQ address."""
    address = address.strip()
    if not address.startswith(SCHEMES) or address.endswith("://"):
        raise ValueError(f"{where} must look like tcp://host:port or ipc:///path, got {address!r}")
    if address.startswith("tcp://") and not address.rsplit(":", 1)[-1].isdigit():
        raise ValueError(f"{where} needs a port (tcp://host:port), got {address!r}")
    return address


def read_workers_file(path: str | Path) -> list[str]:
    """The addresses in the file, in order, without duplicates; ValueError on a bad line."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--workers-file {path}: {e.strerror or e}") from None
    addresses: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        address = check_worker_address(line, f"--workers-file {path} line {number}")
        if address not in addresses:
            addresses.append(address)
    return addresses


class WorkersFileWatcher:
    """Applies changes of the file to a worker list (see the module docstring). Addresses
    in `keep` (the --worker flags) belong to the command line: the file never removes them."""

    def __init__(self, path: str | Path, keep: Sequence[str] = (), interval: float = 1.0) -> None:
        self.path = Path(path)
        self.keep = set(keep)
        self.interval = interval
        self._signature = self._stat()
        # What was applied last (read once the signature is taken: a change after it shows).
        self.current = [a for a in read_workers_file(self.path) if a not in self.keep]

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def poll(self, workers: WorkerList) -> bool:
        """Re-read the file if it changed; True if the worker list changed."""
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            wanted = [a for a in read_workers_file(self.path) if a not in self.keep]
        except ValueError as e:
            logger.error("keeping the current workers: %s", e)
            return False
        added = [a for a in wanted if a not in self.current]
        removed = [a for a in self.current if a not in wanted]
        for address in added:
            workers.add_worker(address)
        for address in removed:
            workers.remove_worker(address)
        self.current = wanted
        if added or removed:
            logger.info("workers file: added %s, removed %s", added, removed)
        return bool(added or removed)

    async def run(self, workers: WorkerList) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.poll(workers)
