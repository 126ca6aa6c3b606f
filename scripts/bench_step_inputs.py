"""Cost of building step inputs on the GPU (Numba kernels) against the host builder's
numpy work for the same decode batch: CPU time per launch and GPU time per step."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from cuda.step_inputs import StepInputArrays, as_numba, bind_outputs, launch_step_inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--output-json")
    args = ap.parse_args()
    rows = []
    for b in args.batch:
        max_blocks = args.context // 16 + 2
        rows_t = torch.arange(b, dtype=torch.int32, device="cuda")
        computed = torch.full((b,), args.context, dtype=torch.int32, device="cuda")
        new = torch.ones(b, dtype=torch.int32, device="cuda")
        tokens = torch.randint(0, 128000, (b, args.context + 8), dtype=torch.int32, device="cuda")
        tables = torch.randint(0, 100000, (b, max_blocks), dtype=torch.int32, device="cuda")
        out = StepInputArrays(
            torch.empty(b + 1, dtype=torch.int32, device="cuda"),
            torch.empty(b, dtype=torch.int32, device="cuda"),
            torch.empty(b, dtype=torch.int64, device="cuda"),
            torch.empty(b, dtype=torch.int64, device="cuda"),
            torch.empty(b, dtype=torch.int64, device="cuda"),
        )
        stream = torch.cuda.current_stream().cuda_stream
        for _ in range(3):
            launch_step_inputs(rows_t, computed, new, tokens, tables, 16, out, b, stream)
        torch.cuda.synchronize()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            launch_step_inputs(rows_t, computed, new, tokens, tables, 16, out, b, stream)
        cpu_us = (time.perf_counter() - t0) / n * 1e6
        # The same with every buffer converted to a Numba array once (a persistent batch).
        br, bc, bn, bt, bb = (as_numba(x) for x in (rows_t, computed, new, tokens, tables))
        bout = bind_outputs(out)
        launch_step_inputs(br, bc, bn, bt, bb, 16, bout, b, stream)
        t0 = time.perf_counter()
        for _ in range(n):
            launch_step_inputs(br, bc, bn, bt, bb, 16, bout, b, stream)
        bound_cpu_us = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            launch_step_inputs(
                rows_t,
                computed,
                new,
                tokens,
                tables,
                16,
                out,
                b,
                torch.cuda.current_stream().cuda_stream,
            )
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        gpu_us = start.elapsed_time(end) / n * 1e3
        # The host builder's numpy work for the same decode batch (slots from tables).
        tab = tables.cpu().numpy()
        pos = np.full(b, args.context, dtype=np.int64)
        t0 = time.perf_counter()
        for _ in range(n):
            slots = tab[np.arange(b), pos // 16].astype(np.int64) * 16 + pos % 16
            qsl = np.concatenate([[0], np.cumsum(np.ones(b, dtype=np.int32))])
            _ = (slots, qsl)
        host_us = (time.perf_counter() - t0) / n * 1e6
        row = dict(
            batch=b,
            launch_cpu_us=cpu_us,
            bound_launch_cpu_us=bound_cpu_us,
            graph_gpu_us=gpu_us,
            numpy_host_us=host_us,
        )
        rows.append(row)
        print(json.dumps(row))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
