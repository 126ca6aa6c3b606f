"""How long the host waits in the eager LM head's GEMM (bf16 [M, H] x [V, H]^T, Llama-3-8B's
H 4096, V 128256) at a row count M it has not run before, while the GPU is busy.

W2's mixed steps held the host 80-180 ms inside this aten::mm at new M (BENCHMARKS session
12). Here, per M: a ~`--busy-ms` sleep kernel is queued, then the GEMM's host time is
taken (perf_counter around the call, no sync inside), first at that M, then again at the
same M behind another sleep; then the same for lm_head_rows(M) after warm_lm_head-style
warming of every bucket. A first call that waits for the sleep shows the block; a second
call that does not shows it is once per shape.

    PYTHONPATH=. python scripts/bench_lm_head_shapes.py --output-json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from worker.input_batch import LM_HEAD_ROW_BUCKET, lm_head_rows


def host_ms(w: torch.Tensor, x: torch.Tensor, busy_cycles: int) -> float:
    torch.cuda._sleep(busy_cycles)  # the GPU is busy: a blocking call waits it out
    t0 = time.perf_counter()
    torch.nn.functional.linear(x, w)
    ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--ms", default="37,41,49,53,77,101,133,181,229,311,467,613,877")
    ap.add_argument("--busy-ms", type=float, default=50.0)
    ap.add_argument("--output-json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    w = torch.randn(args.vocab, args.hidden, device=dev, dtype=torch.bfloat16) * 0.02
    ms = [int(m) for m in args.ms.split(",")]
    x = torch.randn(lm_head_rows(max(ms)), args.hidden, device=dev, dtype=torch.bfloat16)
    # cycles of the sleep kernel for ~busy_ms: calibrate on this card
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(10_000_000)
    b.record()
    b.synchronize()
    cycles = int(10_000_000 * args.busy_ms / a.elapsed_time(b))
    rows = []
    for m in ms:
        first = host_ms(w, x[:m], cycles)
        again = host_ms(w, x[:m], cycles)
        rows.append({"m": m, "first_ms": round(first, 3), "again_ms": round(again, 3)})
        print(f"M {m:5d}: first {first:8.3f} ms, again {again:8.3f} ms", flush=True)
    # warm every bucket with the GPU idle, then fresh unpadded counts take a bucket
    t0 = time.perf_counter()
    for n in range(LM_HEAD_ROW_BUCKET, x.shape[0] + 1, LM_HEAD_ROW_BUCKET):
        torch.nn.functional.linear(x[:n], w)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    bucketed = []
    for m in ms:
        n = lm_head_rows(m + 2)  # M + 2: a count not run above, as its bucket
        first = host_ms(w, x[:n], cycles)
        bucketed.append({"m": m + 2, "bucket": n, "first_ms": round(first, 3)})
        print(f"M {m + 2:5d} as {n:5d} after warming: first {first:8.3f} ms", flush=True)
    out = {
        "card": torch.cuda.get_device_name(),
        "busy_ms": args.busy_ms,
        "warm_s": round(warm_s, 3),
        "new_m": rows,
        "bucketed": bucketed,
    }
    print(json.dumps(out))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
