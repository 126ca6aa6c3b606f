"""Micro-benchmark of the rotary kernels through their public entry points only:
cuda.fused_ops.rotary (q, k in place) and cuda.kv_write_rotary.rotary_write_kv (q, k in
place + K/V into a bf16 cache), so the same script times an older checkout's kernels:

    PYTHONPATH=. python scripts/bench_rotary.py --output-json rotary_new.json
    PYTHONPATH=/path/to/old/checkout python scripts/bench_rotary.py --output-json rotary_old.json
    PYTHONPATH=. python scripts/bench_rotary.py --device cpu   # dry run, tiny shapes

Shapes: Llama-3-8B (32 q / 8 kv heads) and Llama-3-70B (64 / 8), head_dim 128, bf16, T in
1, 64, 880, 4096, 16384; q, k, v are slices of one fused qkv row (as the model passes them),
positions random in the table, slots a random permutation of the cache's.

Timing: CUDA graphs replayed, so Python's launch cost is out. CUDA events, median of
--iters replays after warm-up, two ways:
  cold_us: one call a replay, L2 flushed (256 MB written) before each;
  warm_us: a graph of --repeat back-to-back calls, time / repeat, nothing flushed (q/k stay
           in the 50 MB L2 where they fit, as after the qkv GEMM of a real step).
A GPU sleep ahead of each timed replay hides the graph's launch from the events.
GB/s counts q/k bytes read + written (the rotated dims), and for rotary_write_kv also v read
and the cache's K and V written; the cos/sin table (T x 512 B) is not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cuda import fused_ops
from cuda.kv_write_rotary import rotary_write_kv

MODELS = {"llama3-8b": (32, 8), "llama3-70b": (64, 8)}
HEAD_DIM, MAX_POS, BLOCK_SIZE = 128, 32768, 16
TOKENS = (1, 64, 880, 4096, 16384)
CPU_TOKENS = (1, 3)


def make_case(hq: int, hkv: int, t: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    d = HEAD_DIM
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
    freqs = torch.outer(torch.arange(MAX_POS, device=device).float(), inv)
    num_blocks = -(-t // BLOCK_SIZE) + 1
    return {
        "positions": torch.randint(0, MAX_POS, (t,), device=device),
        "q": q.view(t, hq, d),
        "k": k.view(t, hkv, d),
        "v": v.view(t, hkv, d),
        "kv_cache": torch.zeros(2, num_blocks, BLOCK_SIZE, hkv, d, device=device, dtype=dtype),
        "slot_mapping": torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:t],
        "cos_sin": torch.cat([freqs.cos(), freqs.sin()], dim=-1),
    }


def calls(c: dict[str, Any]) -> dict[str, Callable[[], None]]:
    return {
        "rotary": lambda: fused_ops.rotary(c["positions"], c["q"], c["k"], c["cos_sin"]),
        "rotary_write_kv": lambda: rotary_write_kv(**c),
    }


def bytes_moved(name: str, hq: int, hkv: int, t: int, esize: int) -> int:
    qk = 2 * t * (hq + hkv) * HEAD_DIM * esize  # read + written in place
    return qk + (3 * t * hkv * HEAD_DIM * esize if name == "rotary_write_kv" else 0)


def _graph(fn: Callable[[], None], repeat: int) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and load the module outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    return graph


def _median_us(graph: torch.cuda.CUDAGraph, iters: int, flush: torch.Tensor | None) -> float:
    times = []
    for i in range(iters + 3):
        if flush is not None:
            flush.zero_()
        torch.cuda._sleep(200_000)  # ~0.1 ms of GPU time while the replay is queued
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def bench_gpu(iters: int, repeat: int, tokens: tuple[int, ...]) -> list[dict[str, Any]]:
    dtype = torch.bfloat16
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    rows = []
    for model, (hq, hkv) in MODELS.items():
        for t in tokens:
            c = make_case(hq, hkv, t, "cuda", dtype)
            for name, fn in calls(c).items():
                cold = _median_us(_graph(fn, 1), iters, flush)
                warm = _median_us(_graph(fn, repeat), iters, None) / repeat
                moved = bytes_moved(name, hq, hkv, t, 2)
                rows.append(
                    {
                        "op": name,
                        "model": model,
                        "hq": hq,
                        "hkv": hkv,
                        "tokens": t,
                        "cold_us": round(cold, 2),
                        "warm_us": round(warm, 2),
                        "bytes": moved,
                        "cold_gbps": round(moved / cold / 1e3, 1),
                        "warm_gbps": round(moved / warm / 1e3, 1),
                    }
                )
                print_row(rows[-1])
            del c
    return rows


def bench_cpu() -> list[dict[str, Any]]:
    """The reference paths on tiny shapes: checks the script, times nothing that matters."""
    rows = []
    for model, (hq, hkv) in MODELS.items():
        for t in CPU_TOKENS:
            c = make_case(hq, hkv, t, "cpu", torch.bfloat16)
            for name, fn in calls(c).items():
                t0 = time.perf_counter()
                fn()
                us = (time.perf_counter() - t0) * 1e6
                moved = bytes_moved(name, hq, hkv, t, 2)
                rows.append({"op": name, "model": model, "tokens": t, "cpu_us": round(us, 1)})
                rows[-1]["bytes"] = moved
                print_row(rows[-1])
    return rows


def print_row(r: dict[str, Any]) -> None:
    if "cold_us" in r:
        print(
            f"{r['op']:16s} {r['model']:11s} T={r['tokens']:6d}  cold {r['cold_us']:8.2f} us"
            f" ({r['cold_gbps']:7.1f} GB/s)  warm {r['warm_us']:8.2f} us"
            f" ({r['warm_gbps']:7.1f} GB/s)  {r['bytes'] / 1e6:8.2f} MB",
            flush=True,
        )
    else:
        print(f"{r['op']:16s} {r['model']:11s} T={r['tokens']:3d}  cpu {r['cpu_us']:.0f} us")


def _checkout() -> dict[str, str]:
    """Which checkout's kernels ran: the imported module's path and its git commit."""
    root = Path(fused_ops.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {"fused_ops": str(Path(fused_ops.__file__).resolve()), "commit": commit}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--iters", type=int, default=50, help="timed replays a row (median)")
    p.add_argument("--repeat", type=int, default=20, help="calls a warm-L2 graph")
    p.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    p.add_argument("--output-json", type=Path, default=None)
    args = p.parse_args(argv)
    info = _checkout()
    print(f"kernels from {info['fused_ops']} (commit {info['commit'][:12] or '?'})")
    if args.device == "cuda":
        rows = bench_gpu(args.iters, args.repeat, tuple(args.tokens))
        info["gpu"] = torch.cuda.get_device_name()
    else:
        rows = bench_cpu()
    if args.output_json is not None:
        args.output_json.write_text(json.dumps({**info, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
