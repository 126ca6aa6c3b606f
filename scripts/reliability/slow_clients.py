"""Slow and half-open clients: connections that never finish their headers, bodies that
never finish, bodies sent a byte at a time, and clients that vanish mid-body. The gateway
must close them within its timeouts, keep answering /health meanwhile, and log no ERROR.

    python -m scripts.reliability.slow_clients --connections 1000 --timeout 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx

from scripts.reliability.cluster import cluster

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


async def hostile_connection(port: int, kind: int) -> float | None:
    """Seconds until the server closed it (None: still open after 30 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    if kind == 0:  # headers never finish
        writer.write(HEAD)
    elif kind == 1:  # body never finishes
        writer.write(HEAD + b"Content-Length: 100\r\n\r\n{")
    elif kind == 2:  # a byte now and then (slowloris)
        writer.write(HEAD + b"Content-Length: 100\r\n\r\n")
    else:  # vanish mid-body
        writer.write(HEAD + b'Content-Length: 100\r\n\r\n{"pro')
        await writer.drain()
        writer.close()
        return 0.0
    await writer.drain()
    try:
        async with asyncio.timeout(30):
            while True:
                if kind == 2:
                    try:
                        data = await asyncio.wait_for(reader.read(65536), 0.5)
                    except TimeoutError:  # nothing yet: one more byte
                        writer.write(b" ")
                        await writer.drain()
                        continue
                    if not data:
                        break
                    continue  # the 408; read on to the close
                if not await reader.read(65536):
                    break
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - t0


async def load(base: str, port: int, connections: int) -> dict[str, Any]:
    health: list[float] = []
    stop = asyncio.Event()

    async def ping() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                await c.get(f"{base}/health")
                health.append(time.monotonic() - t0)
                await asyncio.sleep(0.1)

    pinger = asyncio.ensure_future(ping())
    closed = await asyncio.gather(*(hostile_connection(port, i % 4) for i in range(connections)))
    stop.set()
    await pinger
    still_open = sum(t is None for t in closed)
    times = [t for t in closed if t is not None]
    return {
        "connections": connections,
        "still_open_after_30s": still_open,
        "max_seconds_to_close": round(max(times), 2) if times else None,
        "health_max_latency_s": round(max(health), 3) if health else None,
    }


def run(connections: int = 1000, timeout: float = 2.0) -> dict[str, Any]:
    t = str(timeout)
    flags = ("--request-header-timeout", t, "--request-body-timeout", t)
    with cluster(gateway_flags=flags) as c:
        port = int(c.base.rsplit(":", 1)[1])
        result = asyncio.run(load(c.base, port, connections))
        time.sleep(0.5)
        log = c.gateway_log()
    result["gateway_log_lines"] = len(log.splitlines())
    result["gateway_errors_logged"] = log.count(" ERROR ") + log.count("Traceback")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=2.0, help="header and body timeouts (s)")
    a = p.parse_args()
    print(json.dumps(run(a.connections, a.timeout), indent=1))


if __name__ == "__main__":
    main()
